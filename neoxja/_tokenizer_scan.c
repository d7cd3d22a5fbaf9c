/*
 * Compiled candidate scan of the GPT-NeoX-Japanese sub-word encoder.
 *
 * This is the hot loop of neoxja/tokenizer.py (`_scan_py` there is the pure-Python
 * reference that gives the same ids; the tests compare both).  At each position:
 *   - the candidates are the vocabulary entries text[pos:pos+L] for L = 3..1, or for
 *     L = maxlen+1..1 when text[pos] is '<' (clamped at the end of the text);
 *   - a '<...' candidate longer than 2 characters wins at once (the longest is met first);
 *   - otherwise the lowest id wins, and on equal ids the longer candidate;
 *   - with no candidate, one character becomes <KIGOU>, <U2000U2BFF> or its UTF-8 bytes.
 * Lookups need no Python object: one-character entries of the BMP sit in a direct table,
 * entries of 2-3 characters in an open-addressing table keyed by their packed code points
 * (behind a bit filter on their first two characters, as most windows are no entry), and the
 * few longer '<...' entries in a table keyed by an FNV-1a hash of their code points.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* Entries of at most 3 code points are packed into one 64-bit key, (c+1) per 21 bits, so that
 * the key of "ab" differs from that of "ab\0"; 0 marks an empty slot. */
typedef struct {
    uint64_t key;
    long id;
} Short;

/* Longer entries (only '<...' tags can be met by the scan) are compared code point by code point. */
typedef struct {
    uint64_t hash;
    Py_ssize_t len; /* 0 marks an empty slot */
    Py_ssize_t off; /* into the code point pool */
    long id;
} Long;

#define BMP 0x10000
#define PAIR_BITS 20 /* size of the pair filters: 2^20 bits */

typedef struct {
    PyObject_HEAD
    Short *shorts;
    size_t short_mask;
    Long *longs;
    size_t long_mask;
    Py_UCS4 *pool;
    long *single;          /* id of each one-character entry in the BMP, or -1 */
    uint8_t *pair2;        /* filter: bit set if some 2-character entry may start with (c0, c1) */
    uint8_t *pair3;        /* filter: bit set if some 3-character entry may start with (c0, c1) */
    PyObject **id_objects; /* one int object per id, so that appending needs no allocation */
    long n_ids;
    int ready; /* set once __init__ has succeeded */
    Py_ssize_t maxlen;
    long byte_ids[256];
    long kigou_id;
    long u2e_id;
} Scanner;

#define FNV_OFFSET 1469598103934665603ULL
#define FNV_PRIME 1099511628211ULL

static inline uint64_t fnv_step(uint64_t h, Py_UCS4 c) { return (h ^ (uint64_t)c) * FNV_PRIME; }
static inline size_t mix(uint64_t h) { return (size_t)((h * 0x9E3779B97F4A7C15ULL) >> 17); }
static inline uint64_t pack1(Py_UCS4 a) { return (uint64_t)a + 1; }
static inline uint64_t pack2(Py_UCS4 a, Py_UCS4 b) { return pack1(a) | (((uint64_t)b + 1) << 21); }
static inline uint64_t pack3(Py_UCS4 a, Py_UCS4 b, Py_UCS4 c) { return pack2(a, b) | (((uint64_t)c + 1) << 42); }
static inline size_t pair_bit(Py_UCS4 a, Py_UCS4 b) { return mix(pack2(a, b)) & (((size_t)1 << PAIR_BITS) - 1); }
static inline int test_bit(const uint8_t *bits, size_t i) { return (bits[i >> 3] >> (i & 7)) & 1; }

static long lookup_short(const Scanner *s, uint64_t key)
{
    size_t i = mix(key) & s->short_mask;
    for (;;) {
        const Short *e = &s->shorts[i];
        if (e->key == key)
            return e->id;
        if (e->key == 0)
            return -1;
        i = (i + 1) & s->short_mask;
    }
}

static long lookup_long(const Scanner *s, uint64_t h, Py_ssize_t len, int kind, const void *data, Py_ssize_t pos)
{
    size_t i = mix(h) & s->long_mask;
    for (;;) {
        const Long *e = &s->longs[i];
        if (e->len == 0)
            return -1;
        if (e->hash == h && e->len == len) {
            const Py_UCS4 *w = s->pool + e->off;
            Py_ssize_t k = 0;
            while (k < len && w[k] == PyUnicode_READ(kind, data, pos + k))
                k++;
            if (k == len)
                return e->id;
        }
        i = (i + 1) & s->long_mask;
    }
}

static void Scanner_clear_tables(Scanner *self)
{
    PyMem_Free(self->shorts);
    PyMem_Free(self->longs);
    PyMem_Free(self->pool);
    PyMem_Free(self->single);
    PyMem_Free(self->pair2);
    PyMem_Free(self->pair3);
    if (self->id_objects != NULL)
        for (long i = 0; i < self->n_ids; i++)
            Py_XDECREF(self->id_objects[i]);
    PyMem_Free(self->id_objects);
    self->shorts = NULL;
    self->longs = NULL;
    self->pool = NULL;
    self->single = NULL;
    self->pair2 = self->pair3 = NULL;
    self->id_objects = NULL;
    self->n_ids = 0;
    self->ready = 0;
}

static void Scanner_dealloc(Scanner *self)
{
    Scanner_clear_tables(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static size_t table_size(Py_ssize_t n)
{
    size_t cap = 16;
    while (cap < (size_t)n * 3 + 16) /* load factor at most 1/3: misses end fast */
        cap <<= 1;
    return cap;
}

/* Scanner(entries: dict[str, int], maxlen: int, byte_ids: sequence of 256 ints, kigou_id, u2e_id) */
static int Scanner_init(Scanner *self, PyObject *args, PyObject *kwds)
{
    PyObject *entries, *byte_ids;
    Py_ssize_t maxlen;
    long kigou_id, u2e_id;
    static char *kwlist[] = {"entries", "maxlen", "byte_ids", "kigou_id", "u2e_id", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!nOll", kwlist, &PyDict_Type, &entries, &maxlen, &byte_ids,
                                     &kigou_id, &u2e_id))
        return -1;
    Scanner_clear_tables(self);
    if (maxlen < 1) {
        PyErr_SetString(PyExc_ValueError, "maxlen must be at least 1");
        return -1;
    }
    PyObject *seq = PySequence_Fast(byte_ids, "byte_ids must be a sequence");
    if (seq == NULL)
        return -1;
    if (PySequence_Fast_GET_SIZE(seq) != 256) {
        Py_DECREF(seq);
        PyErr_SetString(PyExc_ValueError, "byte_ids must have 256 entries");
        return -1;
    }
    long max_id = kigou_id > u2e_id ? kigou_id : u2e_id;
    for (int b = 0; b < 256; b++) {
        long v = PyLong_AsLong(PySequence_Fast_GET_ITEM(seq, b));
        if (v == -1 && PyErr_Occurred()) {
            Py_DECREF(seq);
            return -1;
        }
        if (v < 0) {
            Py_DECREF(seq);
            PyErr_SetString(PyExc_ValueError, "ids must be non-negative");
            return -1;
        }
        self->byte_ids[b] = v;
        if (v > max_id)
            max_id = v;
    }
    Py_DECREF(seq);
    if (kigou_id < 0 || u2e_id < 0) {
        PyErr_SetString(PyExc_ValueError, "ids must be non-negative");
        return -1;
    }
    self->maxlen = maxlen;
    self->kigou_id = kigou_id;
    self->u2e_id = u2e_id;

    Py_ssize_t n_short = 0, n_long = 0, pool_len = 0, pos = 0;
    PyObject *key, *value;
    while (PyDict_Next(entries, &pos, &key, &value)) {
        if (!PyUnicode_Check(key) || PyUnicode_GET_LENGTH(key) == 0) {
            PyErr_SetString(PyExc_TypeError, "entries keys must be non-empty str");
            return -1;
        }
        long id = PyLong_AsLong(value);
        if (id == -1 && PyErr_Occurred())
            return -1;
        if (id < 0) {
            PyErr_SetString(PyExc_ValueError, "ids must be non-negative");
            return -1;
        }
        if (id > max_id)
            max_id = id;
        Py_ssize_t len = PyUnicode_GET_LENGTH(key);
        if (len <= 3)
            n_short++;
        else {
            n_long++;
            pool_len += len;
        }
    }
    self->short_mask = table_size(n_short) - 1;
    self->long_mask = table_size(n_long) - 1;
    self->shorts = PyMem_Calloc(self->short_mask + 1, sizeof(Short));
    self->longs = PyMem_Calloc(self->long_mask + 1, sizeof(Long));
    self->pool = PyMem_Malloc((pool_len + 1) * sizeof(Py_UCS4));
    self->single = PyMem_Malloc(BMP * sizeof(long));
    self->pair2 = PyMem_Calloc(((size_t)1 << PAIR_BITS) / 8, 1);
    self->pair3 = PyMem_Calloc(((size_t)1 << PAIR_BITS) / 8, 1);
    self->n_ids = max_id + 1;
    self->id_objects = PyMem_Calloc(self->n_ids, sizeof(PyObject *));
    if (!self->shorts || !self->longs || !self->pool || !self->single || !self->pair2 || !self->pair3 ||
        !self->id_objects) {
        PyErr_NoMemory();
        return -1;
    }
    for (long i = 0; i < self->n_ids; i++)
        if ((self->id_objects[i] = PyLong_FromLong(i)) == NULL)
            return -1;
    for (long c = 0; c < BMP; c++)
        self->single[c] = -1;

    Py_ssize_t off = 0;
    pos = 0;
    while (PyDict_Next(entries, &pos, &key, &value)) {
        long id = PyLong_AsLong(value);
        Py_ssize_t len = PyUnicode_GET_LENGTH(key);
        int kind = PyUnicode_KIND(key);
        const void *data = PyUnicode_DATA(key);
        if (len <= 3) {
            Py_UCS4 a = PyUnicode_READ(kind, data, 0);
            uint64_t k;
            if (len == 1) {
                if (a < BMP)
                    self->single[a] = id;
                k = pack1(a);
            }
            else {
                Py_UCS4 b = PyUnicode_READ(kind, data, 1);
                size_t bit = pair_bit(a, b);
                if (len == 2) {
                    self->pair2[bit >> 3] |= (uint8_t)(1 << (bit & 7));
                    k = pack2(a, b);
                }
                else {
                    self->pair3[bit >> 3] |= (uint8_t)(1 << (bit & 7));
                    k = pack3(a, b, PyUnicode_READ(kind, data, 2));
                }
            }
            size_t i = mix(k) & self->short_mask;
            while (self->shorts[i].key != 0)
                i = (i + 1) & self->short_mask;
            self->shorts[i].key = k;
            self->shorts[i].id = id;
            continue;
        }
        uint64_t h = FNV_OFFSET;
        for (Py_ssize_t k = 0; k < len; k++) {
            Py_UCS4 c = PyUnicode_READ(kind, data, k);
            self->pool[off + k] = c;
            h = fnv_step(h, c);
        }
        size_t i = mix(h) & self->long_mask;
        while (self->longs[i].len != 0)
            i = (i + 1) & self->long_mask;
        self->longs[i].hash = h;
        self->longs[i].len = len;
        self->longs[i].off = off;
        self->longs[i].id = id;
        off += len;
    }
    self->ready = 1;
    return 0;
}

/* The two symbol ranges of the original encoder (it tests UTF-8 byte values; these are the same code points). */
static inline int is_kigou(Py_UCS4 c)
{
    return (c >= 0xA1 && c <= 0xBF) || (c >= 0x1C0 && c <= 0x1C3) || (c >= 0x2B9 && c <= 0x362);
}
static inline int is_u2e(Py_UCS4 c) { return c >= 0x2000 && c <= 0x2BFF; }

static inline int append_id(const Scanner *s, PyObject *out, long id) { return PyList_Append(out, s->id_objects[id]); }

/* Id of the entry text[pos:pos+len], len <= 3, or -1. */
static inline long lookup_at(const Scanner *s, int kind, const void *data, Py_ssize_t pos, Py_ssize_t len)
{
    Py_UCS4 a = PyUnicode_READ(kind, data, pos);
    if (len == 1)
        return a < BMP ? s->single[a] : lookup_short(s, pack1(a));
    Py_UCS4 b = PyUnicode_READ(kind, data, pos + 1);
    if (!test_bit(len == 2 ? s->pair2 : s->pair3, pair_bit(a, b)))
        return -1;
    if (len == 2)
        return lookup_short(s, pack2(a, b));
    return lookup_short(s, pack3(a, b, PyUnicode_READ(kind, data, pos + 2)));
}

/* scan(text: str) -> list[int] */
static PyObject *Scanner_scan(Scanner *self, PyObject *text)
{
    if (!PyUnicode_Check(text)) {
        PyErr_Format(PyExc_TypeError, "scan() needs a str, not %.100s", Py_TYPE(text)->tp_name);
        return NULL;
    }
    if (!self->ready) {
        PyErr_SetString(PyExc_RuntimeError, "Scanner was not initialised");
        return NULL;
    }
    Py_ssize_t n = PyUnicode_GET_LENGTH(text);
    int kind = PyUnicode_KIND(text);
    const void *data = PyUnicode_DATA(text);
    PyObject *out = PyList_New(0);
    if (out == NULL)
        return NULL;
    /* prefix hashes for the '<' case: hashes[len] is the hash of text[pos:pos+len] */
    uint64_t stack_hashes[64];
    uint64_t *hashes = stack_hashes;
    if (self->maxlen + 2 > 64 && (hashes = PyMem_Malloc((self->maxlen + 2) * sizeof(uint64_t))) == NULL) {
        Py_DECREF(out);
        return PyErr_NoMemory();
    }
    Py_ssize_t pos = 0;
    while (pos < n) {
        Py_UCS4 c0 = PyUnicode_READ(kind, data, pos);
        Py_ssize_t max_len = n - pos < 3 ? n - pos : 3;
        long best_id = -1;
        Py_ssize_t best_len = 0;
        if (c0 == '<') {
            /* A tag-like entry longer than 2 characters wins at once: the longest is met first. */
            Py_ssize_t longest = n - pos < self->maxlen + 1 ? n - pos : self->maxlen + 1;
            uint64_t h = FNV_OFFSET;
            for (Py_ssize_t k = 0; k < longest; k++)
                hashes[k + 1] = h = fnv_step(h, PyUnicode_READ(kind, data, pos + k));
            for (Py_ssize_t len = longest; len >= 4 && best_id < 0; len--) {
                long id = lookup_long(self, hashes[len], len, kind, data, pos);
                if (id >= 0) {
                    best_id = id;
                    best_len = len;
                }
            }
            if (best_id < 0 && max_len == 3) {
                long id = lookup_at(self, kind, data, pos, 3);
                if (id >= 0) {
                    best_id = id;
                    best_len = 3;
                }
            }
            if (best_id < 0 && max_len > 2)
                max_len = 2;
        }
        if (best_id < 0) {
            for (Py_ssize_t len = max_len; len >= 1; len--) {
                long id = lookup_at(self, kind, data, pos, len);
                if (id >= 0 && (best_id < 0 || id < best_id)) {
                    best_id = id;
                    best_len = len;
                }
            }
        }
        if (best_id >= 0) {
            if (append_id(self, out, best_id) < 0)
                goto error;
            pos += best_len;
            continue;
        }
        if (is_kigou(c0)) {
            if (append_id(self, out, self->kigou_id) < 0)
                goto error;
        }
        else if (is_u2e(c0)) {
            if (append_id(self, out, self->u2e_id) < 0)
                goto error;
        }
        else {
            unsigned char b[4];
            int nb;
            if (c0 < 0x80) {
                b[0] = (unsigned char)c0;
                nb = 1;
            }
            else if (c0 < 0x800) {
                b[0] = 0xC0 | (c0 >> 6);
                b[1] = 0x80 | (c0 & 0x3F);
                nb = 2;
            }
            else if (c0 < 0x10000) {
                if (c0 >= 0xD800 && c0 <= 0xDFFF) {
                    PyErr_Format(PyExc_ValueError,
                                 "lone surrogate U+%04X at position %zd of the normalised text has no UTF-8 form",
                                 (unsigned)c0, pos);
                    goto error;
                }
                b[0] = 0xE0 | (c0 >> 12);
                b[1] = 0x80 | ((c0 >> 6) & 0x3F);
                b[2] = 0x80 | (c0 & 0x3F);
                nb = 3;
            }
            else {
                b[0] = 0xF0 | (c0 >> 18);
                b[1] = 0x80 | ((c0 >> 12) & 0x3F);
                b[2] = 0x80 | ((c0 >> 6) & 0x3F);
                b[3] = 0x80 | (c0 & 0x3F);
                nb = 4;
            }
            for (int k = 0; k < nb; k++)
                if (append_id(self, out, self->byte_ids[b[k]]) < 0)
                    goto error;
        }
        pos += 1;
    }
    if (hashes != stack_hashes)
        PyMem_Free(hashes);
    return out;
error:
    if (hashes != stack_hashes)
        PyMem_Free(hashes);
    Py_DECREF(out);
    return NULL;
}

static PyMethodDef Scanner_methods[] = {
    {"scan", (PyCFunction)Scanner_scan, METH_O, "scan(text) -> list of token ids of the normalised text"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject ScannerType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "neoxja._tokenizer_scan.Scanner",
    .tp_basicsize = sizeof(Scanner),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Candidate scan over a vocabulary (compiled fast path of neoxja.tokenizer)",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Scanner_init,
    .tp_dealloc = (destructor)Scanner_dealloc,
    .tp_methods = Scanner_methods,
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "_tokenizer_scan", "Compiled fast path of neoxja.tokenizer", -1, NULL,
};

PyMODINIT_FUNC PyInit__tokenizer_scan(void)
{
    if (PyType_Ready(&ScannerType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&moduledef);
    if (m == NULL)
        return NULL;
    Py_INCREF(&ScannerType);
    if (PyModule_AddObject(m, "Scanner", (PyObject *)&ScannerType) < 0) {
        Py_DECREF(&ScannerType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
