/* Strict checks of the envelope strings svantic.v1 fixes the format of (spec section 2).
 *
 * (And WebSocket masking, which framing.py would otherwise do with big-int arithmetic.)
 *
 * Why C: msgspec parses a small frame in about 0.5 us, and Python's `re` needs
 * about 1 us to check the id, ts, in_reply_to and trace ids of that frame. These
 * checks are the same rules as the regular expressions in frames.py, character
 * by character; codec.py falls back to those expressions when this module is not
 * built, and tests/core/test_speedups.py holds the two to the same answers.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stdint.h>
#include <string.h>


#define IS_DIGIT(c) ((c) >= '0' && (c) <= '9')

/* 1 for [0-9a-f], else 0 (filled in by the module's init). A table, and no branch per
 * character: the ids of a frame are most of what frame_ok reads, and a compare chain per
 * character cost more than the rest of the check. */
static unsigned char lower_hex[256];

/* 1 when all n bytes at s are [0-9a-f]. Branch-free so the compiler can unroll it. */
static inline int
all_lower_hex(const unsigned char *s, Py_ssize_t n)
{
    unsigned char ok = 1;
    for (Py_ssize_t i = 0; i < n; i++) {
        ok &= lower_hex[s[i]];
    }
    return ok;
}

/* The ASCII bytes of a str, or NULL (and *len untouched) for anything else. */
static const unsigned char *
ascii_data(PyObject *value, Py_ssize_t *len)
{
    if (!PyUnicode_Check(value) || !PyUnicode_IS_ASCII(value)) {
        return NULL;
    }
    *len = PyUnicode_GET_LENGTH(value);
    return PyUnicode_1BYTE_DATA(value);
}

/* ^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\Z */
static int
is_uuid(PyObject *value)
{
    Py_ssize_t n;
    const unsigned char *s = ascii_data(value, &n);
    if (s == NULL || n != 36 || s[8] != '-' || s[13] != '-' || s[18] != '-' || s[23] != '-') {
        return 0;
    }
    return all_lower_hex(s, 8) & all_lower_hex(s + 9, 4) & all_lower_hex(s + 14, 4)
           & all_lower_hex(s + 19, 4) & all_lower_hex(s + 24, 12);
}

/* ^[0-9a-f]{n}\Z */
static int
is_lower_hex(PyObject *value, Py_ssize_t want)
{
    Py_ssize_t n;
    const unsigned char *s = ascii_data(value, &n);
    return s != NULL && n == want && all_lower_hex(s, n);
}

/* Two digits at s, as a number; -1 if either is not [0-9]. */
static int
two_digits(const unsigned char *s)
{
    if (!IS_DIGIT(s[0]) || !IS_DIGIT(s[1])) {
        return -1;
    }
    return (s[0] - '0') * 10 + (s[1] - '0');
}

/* RFC 3339 date-time with a `T` and an offset: frames.TIMESTAMP_PATTERN. */
static int
is_timestamp(PyObject *value)
{
    Py_ssize_t n;
    const unsigned char *s = ascii_data(value, &n);
    int month, day, hour, minute, second;
    Py_ssize_t i;
    if (s == NULL || n < 20) {
        return 0;
    }
    if (!IS_DIGIT(s[0]) || !IS_DIGIT(s[1]) || !IS_DIGIT(s[2]) || !IS_DIGIT(s[3])
        || s[4] != '-' || s[7] != '-' || s[10] != 'T' || s[13] != ':' || s[16] != ':') {
        return 0;
    }
    month = two_digits(s + 5);
    day = two_digits(s + 8);
    hour = two_digits(s + 11);
    minute = two_digits(s + 14);
    second = two_digits(s + 17);
    if (month < 1 || month > 12 || day < 1 || day > 31 || hour < 0 || hour > 23
        || minute < 0 || minute > 59 || second < 0 || second > 60) {
        return 0;
    }
    i = 19;
    if (s[i] == '.') {
        Py_ssize_t first = ++i;
        while (i < n && IS_DIGIT(s[i])) {
            i++;
        }
        if (i == first || i == n) {
            return 0;
        }
    }
    if (s[i] == 'Z') {
        return i + 1 == n;
    }
    if ((s[i] == '+' || s[i] == '-') && n - i == 6 && s[i + 3] == ':') {
        hour = two_digits(s + i + 1);
        minute = two_digits(s + i + 4);
        return hour >= 0 && hour <= 23 && minute >= 0 && minute <= 59;
    }
    return 0;
}

/* Where a frame type keeps its envelope fields.
 *
 * msgspec stores Struct fields in slots (member descriptors), so after a
 * first look-up per type the fields are read at fixed offsets: five generic
 * attribute look-ups would cost more than all the checks together. The same
 * goes for the payload field a payload rule reads (`dispatch_id`,
 * `replayed_dispatches`): two generic look-ups made frame_ok half again as
 * slow for a cancel, so its offset is learnt from the first payload seen.
 */
enum { F_ID, F_TS, F_REPLY, F_TRACE, F_SPAN, N_FIELDS };
enum { PAYLOAD_NONE, PAYLOAD_DISPATCH, PAYLOAD_CANCEL, PAYLOAD_WELCOME };
#define ABSENT (-1) /* not a field of this type: reads as None */
#define MAX_TYPES 32
#define TABLE_SIZE 64 /* power of two, more than MAX_TYPES: a probe always ends */

typedef struct {
    PyTypeObject *type; /* a strong reference */
    Py_ssize_t offset[N_FIELDS];
    int payload_rule;
    Py_ssize_t payload_offset;  /* ABSENT: read `payload` by name */
    PyTypeObject *payload_type; /* NULL until learnt; then a strong reference */
    Py_ssize_t rule_offset;     /* of the field the rule reads, in a `payload_type` */
} Layout;

static Layout layouts[MAX_TYPES];
static int n_layouts;
/* Open addressing on the type's address: a frame's layout is found in one probe or two, where
 * a scan of the layouts in first-seen order took up to MAX_TYPES compares. */
static Layout *table[TABLE_SIZE];
static PyObject *field_names[N_FIELDS];
static PyObject *name_payload, *name_dispatch_id, *name_replayed;
static PyObject *rule_types[4]; /* set by configure(): dispatch, cancel, welcome types */

static size_t
table_slot(PyTypeObject *type)
{
    return ((uintptr_t)type >> 4) & (TABLE_SIZE - 1);
}

/* The offset of `name` when `type` keeps it in an object slot, else ABSENT; -2 on error. */
static Py_ssize_t
member_offset(PyTypeObject *type, PyObject *name)
{
    Py_ssize_t offset = ABSENT;
    PyObject *descr = PyObject_GetAttr((PyObject *)type, name);
    if (descr == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_AttributeError)) {
            return -2;
        }
        PyErr_Clear();
        return ABSENT;
    }
    if (Py_IS_TYPE(descr, &PyMemberDescr_Type)) {
        PyMemberDef *member = ((PyMemberDescrObject *)descr)->d_member;
        if (member->type == T_OBJECT_EX || member->type == T_OBJECT) {
            offset = member->offset;
        }
    }
    Py_DECREF(descr);
    return offset;
}

/* The layout of `type`, found once; NULL (no exception) when it is not a slot Struct. */
static Layout *
layout_of(PyTypeObject *type)
{
    size_t h = table_slot(type);
    while (table[h] != NULL) {
        if (table[h]->type == type) {
            return table[h];
        }
        h = (h + 1) & (TABLE_SIZE - 1);
    }
    if (n_layouts == MAX_TYPES) {
        return NULL;
    }
    Layout layout;
    layout.type = type;
    layout.payload_rule = PAYLOAD_NONE;
    layout.payload_type = NULL;
    layout.rule_offset = ABSENT;
    for (int rule = PAYLOAD_DISPATCH; rule <= PAYLOAD_WELCOME; rule++) {
        if ((PyObject *)type == rule_types[rule]) {
            layout.payload_rule = rule;
        }
    }
    for (int f = 0; f < N_FIELDS; f++) {
        PyObject *descr = PyObject_GetAttr((PyObject *)type, field_names[f]);
        if (descr == NULL) {
            PyErr_Clear();
            return NULL;
        }
        if (Py_IS_TYPE(descr, &PyMemberDescr_Type)) {
            PyMemberDef *member = ((PyMemberDescrObject *)descr)->d_member;
            if (member->type != T_OBJECT_EX && member->type != T_OBJECT) {
                Py_DECREF(descr);
                return NULL;
            }
            layout.offset[f] = member->offset;
        }
        else if (descr == Py_None && f == F_REPLY) {
            layout.offset[f] = ABSENT; /* frames.py sets `in_reply_to = None` on the class */
        }
        else {
            Py_DECREF(descr);
            return NULL;
        }
        Py_DECREF(descr);
    }
    layout.payload_offset = ABSENT;
    if (layout.payload_rule != PAYLOAD_NONE) {
        layout.payload_offset = member_offset(type, name_payload);
        if (layout.payload_offset == -2) {
            PyErr_Clear();
            return NULL;
        }
    }
    Py_INCREF(type);
    layouts[n_layouts] = layout;
    table[h] = &layouts[n_layouts];
    return &layouts[n_layouts++];
}

static PyObject *
slot(PyObject *frame, const Layout *layout, int field)
{
    if (layout->offset[field] == ABSENT) {
        return Py_None;
    }
    return *(PyObject **)((char *)frame + layout->offset[field]); /* NULL when unset */
}

/* The field a payload rule reads: a new reference, or NULL with an exception set. */
static PyObject *
rule_value_by_name(PyObject *frame, int rule)
{
    PyObject *payload = PyObject_GetAttr(frame, name_payload);
    PyObject *value;
    if (payload == NULL) {
        return NULL;
    }
    value = PyObject_GetAttr(payload, rule == PAYLOAD_WELCOME ? name_replayed : name_dispatch_id);
    Py_DECREF(payload);
    return value;
}

/* A payload rule applied to the value it reads: 1 or 0. */
static int
rule_holds(PyObject *value, PyObject *id, int rule)
{
    if (rule == PAYLOAD_DISPATCH) {
        return PyUnicode_Check(value) && PyUnicode_Compare(value, id) == 0;
    }
    if (rule == PAYLOAD_CANCEL) {
        return is_uuid(value);
    }
    if (!PyList_Check(value)) {
        return 0;
    }
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(value); i++) {
        if (!is_uuid(PyList_GET_ITEM(value, i))) {
            return 0;
        }
    }
    return 1;
}

/* Payload rules checked with the envelope (see codec.py); 1, 0 or -1 on error. */
static int
payload_ok(PyObject *frame, PyObject *id, int rule)
{
    int ok;
    PyObject *value = rule_value_by_name(frame, rule);
    if (value == NULL) {
        return -1;
    }
    ok = rule_holds(value, id, rule);
    Py_DECREF(value);
    return ok;
}

/* payload_ok through the layout's offsets, once the payload's type is known; the payload
 * type is learnt from the first payload seen, and any other type is read by name. */
static int
payload_ok_at(PyObject *frame, PyObject *id, Layout *layout)
{
    PyObject *payload, *value;
    if (layout->payload_offset == ABSENT) {
        return payload_ok(frame, id, layout->payload_rule);
    }
    payload = *(PyObject **)((char *)frame + layout->payload_offset);
    if (payload == NULL) {
        return payload_ok(frame, id, layout->payload_rule); /* raises AttributeError */
    }
    if (layout->payload_type == NULL) {
        PyTypeObject *type = Py_TYPE(payload);
        PyObject *name = layout->payload_rule == PAYLOAD_WELCOME ? name_replayed
                                                                  : name_dispatch_id;
        Py_ssize_t offset = member_offset(type, name);
        if (offset == -2) {
            return -1;
        }
        if (offset != ABSENT) {
            Py_INCREF(type);
            layout->payload_type = type;
            layout->rule_offset = offset;
        }
    }
    if (Py_TYPE(payload) != layout->payload_type) {
        return payload_ok(frame, id, layout->payload_rule);
    }
    value = *(PyObject **)((char *)payload + layout->rule_offset);
    if (value == NULL) {
        return payload_ok(frame, id, layout->payload_rule); /* raises AttributeError */
    }
    return rule_holds(value, id, layout->payload_rule);
}

static int
fields_ok(PyObject *const *v)
{
    return is_uuid(v[F_ID]) && is_timestamp(v[F_TS])
           && (v[F_REPLY] == Py_None || is_uuid(v[F_REPLY]))
           && (v[F_TRACE] == Py_None || is_lower_hex(v[F_TRACE], 32))
           && (v[F_SPAN] == Py_None || is_lower_hex(v[F_SPAN], 16));
}

/* The slow way, for a type whose fields are not slots (another msgspec, a stand-in):
 * 1, 0 or -1 with an exception set. */
static int
frame_ok_by_name(PyObject *frame)
{
    PyObject *v[N_FIELDS] = {NULL};
    int ok = -1, rule = PAYLOAD_NONE;
    for (int f = 0; f < N_FIELDS; f++) {
        v[f] = PyObject_GetAttr(frame, field_names[f]);
        if (v[f] == NULL) {
            goto done;
        }
    }
    ok = fields_ok(v);
    for (int r = PAYLOAD_DISPATCH; r <= PAYLOAD_WELCOME; r++) {
        if ((PyObject *)Py_TYPE(frame) == rule_types[r]) {
            rule = r;
        }
    }
    if (ok && rule != PAYLOAD_NONE) {
        ok = payload_ok(frame, v[F_ID], rule);
    }
done:
    for (int f = 0; f < N_FIELDS; f++) {
        Py_XDECREF(v[f]);
    }
    return ok;
}

/* 1 when the bytes of a message are valid UTF-8, 0 when not, -1 on another error.
 *
 * msgspec does not check the UTF-8 of the fields it skips, so the codec must. Checking
 * here, in the call that checks the frame, spares decode_frame a `type(data) is bytes and
 * data.isascii()` of its own (about 20 ns, a tenth of parsing a small frame): a word-wide
 * scan settles an ASCII message, and only other messages are decoded. */
static int
utf8_ok(PyObject *data)
{
    const unsigned char *s = (const unsigned char *)PyBytes_AS_STRING(data);
    Py_ssize_t n = PyBytes_GET_SIZE(data), i = 0;
    uint64_t high = 0;
    unsigned char tail = 0;
    PyObject *text;
    for (; i + 8 <= n; i += 8) {
        uint64_t word;
        memcpy(&word, s + i, 8);
        high |= word;
    }
    for (; i < n; i++) {
        tail |= s[i];
    }
    if (((high & UINT64_C(0x8080808080808080)) | (tail & 0x80)) == 0) {
        return 1;
    }
    text = PyUnicode_DecodeUTF8((const char *)s, n, "strict");
    if (text != NULL) {
        Py_DECREF(text);
        return 1;
    }
    if (PyErr_ExceptionMatches(PyExc_UnicodeDecodeError)) {
        PyErr_Clear();
        return 0;
    }
    return -1;
}

static PyObject *
frame_ok(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    PyObject *frame, *v[N_FIELDS];
    Layout *layout;
    int ok = 1;
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "frame_ok(frame, data=None)");
        return NULL;
    }
    frame = args[0];
    layout = layout_of(Py_TYPE(frame));
    if (layout == NULL) {
        ok = frame_ok_by_name(frame);
    }
    else {
        for (int f = 0; f < N_FIELDS && ok; f++) {
            v[f] = slot(frame, layout, f);
            ok = v[f] != NULL;
        }
        ok = ok && fields_ok(v);
        if (ok && layout->payload_rule != PAYLOAD_NONE) {
            ok = payload_ok_at(frame, v[F_ID], layout);
        }
    }
    if (ok == 1 && nargs == 2 && PyBytes_CheckExact(args[1])) {
        ok = utf8_ok(args[1]);
    }
    if (ok < 0) {
        return NULL;
    }
    return PyBool_FromLong(ok);
}

static PyObject *
configure(PyObject *module, PyObject *args)
{
    (void)module;
    PyObject *dispatch, *cancel, *welcome;
    if (!PyArg_ParseTuple(args, "OOO", &dispatch, &cancel, &welcome)) {
        return NULL;
    }
    Py_INCREF(dispatch);
    Py_INCREF(cancel);
    Py_INCREF(welcome);
    rule_types[PAYLOAD_DISPATCH] = dispatch;
    rule_types[PAYLOAD_CANCEL] = cancel;
    rule_types[PAYLOAD_WELCOME] = welcome;
    Py_RETURN_NONE;
}

static PyObject *
py_is_uuid(PyObject *module, PyObject *value)
{
    (void)module;
    return PyBool_FromLong(is_uuid(value));
}

static PyObject *
py_is_timestamp(PyObject *module, PyObject *value)
{
    (void)module;
    return PyBool_FromLong(is_timestamp(value));
}

static PyObject *
py_is_lower_hex(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    Py_ssize_t want;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "is_lower_hex(value, length)");
        return NULL;
    }
    want = PyLong_AsSsize_t(args[1]);
    if (want == -1 && PyErr_Occurred()) {
        return NULL;
    }
    return PyBool_FromLong(is_lower_hex(args[0], want));
}

/* data[start:stop] XOR the repeated 4-byte key (RFC 6455 5.3): framing.py's `_xor_mask`. */
static PyObject *
xor_mask(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    Py_buffer data, key;
    Py_ssize_t start, stop;
    PyObject *out = NULL;
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "xor_mask(data, start, stop, key)");
        return NULL;
    }
    start = PyLong_AsSsize_t(args[1]);
    stop = PyLong_AsSsize_t(args[2]);
    if ((start == -1 || stop == -1) && PyErr_Occurred()) {
        return NULL;
    }
    if (PyObject_GetBuffer(args[0], &data, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    if (PyObject_GetBuffer(args[3], &key, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&data);
        return NULL;
    }
    if (key.len != 4 || start < 0 || stop < start || stop > data.len) {
        PyErr_SetString(PyExc_ValueError, "need a 4-byte key and 0 <= start <= stop <= len(data)");
    }
    else {
        out = PyBytes_FromStringAndSize(NULL, stop - start);
        if (out != NULL) {
            const unsigned char *src = (const unsigned char *)data.buf + start;
            const unsigned char *k = key.buf;
            unsigned char *dst = (unsigned char *)PyBytes_AS_STRING(out);
            for (Py_ssize_t i = 0; i < stop - start; i++) {
                dst[i] = src[i] ^ k[i & 3];
            }
        }
    }
    PyBuffer_Release(&key);
    PyBuffer_Release(&data);
    return out;
}

static PyMethodDef methods[] = {
    {"frame_ok", (PyCFunction)(void (*)(void))frame_ok, METH_FASTCALL,
     "frame_ok(frame, data=None): True when a decoded frame's id, ts, in_reply_to, trace_id "
     "and parent_span_id have the formats spec section 2 fixes, its payload the rules codec.py "
     "checks after the parse, and `data` (the message it was read from), when it is bytes, is "
     "valid UTF-8."},
    {"configure", configure, METH_VARARGS,
     "configure(dispatch, cancel, welcome): the frame types whose payload rules frame_ok checks."},
    {"xor_mask", (PyCFunction)(void (*)(void))xor_mask, METH_FASTCALL,
     "data[start:stop] XOR the repeated 4-byte key (WebSocket masking, RFC 6455 5.3)."},
    {"is_uuid", py_is_uuid, METH_O, "True for a canonical lowercase UUID string."},
    {"is_timestamp", py_is_timestamp, METH_O,
     "True for an RFC 3339 timestamp with a `T` and an offset."},
    {"is_lower_hex", (PyCFunction)(void (*)(void))py_is_lower_hex, METH_FASTCALL,
     "True for a string of exactly `length` lowercase hex digits."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_speedups",
    .m_doc = "C versions of the codec's strict checks and of WebSocket masking (optional; "
             "codec.py and framing.py have fallbacks).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    static const char *names[N_FIELDS] = {"id", "ts", "in_reply_to", "trace_id",
                                          "parent_span_id"};
    for (int f = 0; f < N_FIELDS; f++) {
        field_names[f] = PyUnicode_InternFromString(names[f]);
        if (field_names[f] == NULL) {
            return NULL;
        }
    }
    name_payload = PyUnicode_InternFromString("payload");
    name_dispatch_id = PyUnicode_InternFromString("dispatch_id");
    name_replayed = PyUnicode_InternFromString("replayed_dispatches");
    if (!name_payload || !name_dispatch_id || !name_replayed) {
        return NULL;
    }
    for (int c = '0'; c <= '9'; c++) {
        lower_hex[c] = 1;
    }
    for (int c = 'a'; c <= 'f'; c++) {
        lower_hex[c] = 1;
    }
    return PyModule_Create(&module_def);
}
