/* Checksums and bounds of a packed run of journal records, in C (journal/native.py is its interface).

   verified_prefix(buf) -> int
       The length of the longest prefix of ``buf`` made of whole records of format
       version 2 (journal/records.py) whose XXH3-128 checksums match: 0 when the first
       record is not one. It vouches for nothing past that point and raises nothing:
       whatever follows (a version 1 record, a truncated one, a mismatch) is for the
       Python decoder to check and to name (``decode_records``), so every error a peer
       or a disk can cause is reported exactly as without this module.

   A receiver checks every record it is sent (one call per RECORDS frame, at most a few
   MiB); the Python check cost ~2.7 us of a 4 KiB record's ~4.8 us decoding
   (bench/RESULTS.md).

   framed_run(buf, start, end, prev_lsn, limit, max_name, max_data, versions, types)
       -> (stop, count, first_lsn, last_lsn, first_ts_ns)
       The longest run of whole, well-formed records in buf[start:end] from ``start``
       (magic, a version and a type whose byte is set in the 256-byte tables
       ``versions`` and ``types``, lengths within ``max_name``/``max_data``), each LSN
       above the one before it (the first above ``prev_lsn`` unless that is None), whose
       bytes fit in ``limit``. Checksums are not looked at. It stops at the first record
       that is not one of those and raises nothing about it: the Python framing names
       what is wrong there (``journal/records.py``, ``framed_run``). A sender ships what
       it journaled as such runs, one call per read chunk, instead of finding each
       record's bounds in Python (~6 us a 4 KiB record). */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <string.h>

#define XXH_INLINE_ALL
#include <xxhash.h>

#define RECORD_HEADER 58
#define CHECKED_HEADER 42
#define RECORD_VERSION 2

static uint32_t le32(const unsigned char *p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

static PyObject *verified_prefix(PyObject *self, PyObject *arg) {
    Py_buffer buf;
    if (PyObject_GetBuffer(arg, &buf, PyBUF_SIMPLE) != 0) return NULL;
    const unsigned char *p = (const unsigned char *)buf.buf;
    Py_ssize_t at = 0;
    XXH3_state_t state;
    while (buf.len - at >= RECORD_HEADER) {
        const unsigned char *rec = p + at;
        if (rec[0] != 'R' || rec[1] != 'J' || rec[2] != RECORD_VERSION) break;
        uint64_t name_len = (uint64_t)rec[4] | ((uint64_t)rec[5] << 8);
        uint64_t data_len = le32(rec + 6);
        uint64_t body = name_len + data_len;
        if (body > (uint64_t)(buf.len - at - RECORD_HEADER)) break;
        XXH3_128bits_reset(&state);
        XXH3_128bits_update(&state, rec, CHECKED_HEADER);
        XXH3_128bits_update(&state, rec + RECORD_HEADER, (size_t)body);
        XXH128_canonical_t digest;
        XXH128_canonicalFromHash(&digest, XXH3_128bits_digest(&state));
        if (memcmp(digest.digest, rec + CHECKED_HEADER, sizeof digest.digest) != 0) break;
        at += RECORD_HEADER + (Py_ssize_t)body;
    }
    PyBuffer_Release(&buf);
    return PyLong_FromSsize_t(at);
}

static uint64_t le64(const unsigned char *p) {
    return (uint64_t)le32(p) | ((uint64_t)le32(p + 4) << 32);
}

static int table_arg(PyObject *arg, Py_buffer *view, const char *what) {
    if (PyObject_GetBuffer(arg, view, PyBUF_SIMPLE) != 0) return -1;
    if (view->len != 256) {
        PyBuffer_Release(view);
        PyErr_Format(PyExc_ValueError, "framed_run: %s must be a table of 256 bytes", what);
        return -1;
    }
    return 0;
}

static PyObject *framed_run(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 9) {
        PyErr_SetString(PyExc_TypeError, "framed_run takes 9 arguments");
        return NULL;
    }
    Py_ssize_t start = PyLong_AsSsize_t(args[1]);
    Py_ssize_t end = PyLong_AsSsize_t(args[2]);
    int has_prev = args[3] != Py_None;
    uint64_t prev = has_prev ? PyLong_AsUnsignedLongLong(args[3]) : 0;
    Py_ssize_t limit = PyLong_AsSsize_t(args[4]);
    uint64_t max_name = PyLong_AsUnsignedLongLong(args[5]);
    uint64_t max_data = PyLong_AsUnsignedLongLong(args[6]);
    if (PyErr_Occurred()) return NULL;
    Py_buffer buf, versions, types;
    if (PyObject_GetBuffer(args[0], &buf, PyBUF_SIMPLE) != 0) return NULL;
    if (table_arg(args[7], &versions, "versions") != 0) {
        PyBuffer_Release(&buf);
        return NULL;
    }
    if (table_arg(args[8], &types, "types") != 0) {
        PyBuffer_Release(&versions);
        PyBuffer_Release(&buf);
        return NULL;
    }
    if (start < 0 || end > buf.len || start > end || limit < 0) {
        PyBuffer_Release(&types);
        PyBuffer_Release(&versions);
        PyBuffer_Release(&buf);
        PyErr_SetString(PyExc_ValueError, "framed_run: start, end or limit out of range");
        return NULL;
    }
    const unsigned char *p = (const unsigned char *)buf.buf;
    const unsigned char *version_ok = (const unsigned char *)versions.buf;
    const unsigned char *type_ok = (const unsigned char *)types.buf;
    Py_ssize_t at = start;
    uint64_t count = 0, first = 0, last = 0;
    int64_t first_ts = 0;
    while (end - at >= RECORD_HEADER) {
        const unsigned char *rec = p + at;
        if (rec[0] != 'R' || rec[1] != 'J' || !version_ok[rec[2]] || !type_ok[rec[3]]) break;
        uint64_t name_len = (uint64_t)rec[4] | ((uint64_t)rec[5] << 8);
        uint64_t data_len = le32(rec + 6);
        if (name_len > max_name || data_len > max_data) break;
        uint64_t total = RECORD_HEADER + name_len + data_len;
        if (total > (uint64_t)(end - at) || total > (uint64_t)(limit - (at - start))) break;
        uint64_t lsn = le64(rec + 10);
        if ((count || has_prev) && lsn <= prev) break;
        if (!count) {
            first = lsn;
            first_ts = (int64_t)le64(rec + 18);
        }
        prev = last = lsn;
        count++;
        at += (Py_ssize_t)total;
    }
    PyBuffer_Release(&types);
    PyBuffer_Release(&versions);
    PyBuffer_Release(&buf);
    return Py_BuildValue("(nKKKL)", at, (unsigned long long)count, (unsigned long long)first,
                         (unsigned long long)last, (long long)first_ts);
}

static PyMethodDef methods[] = {
    {"framed_run", (PyCFunction)(void (*)(void))framed_run, METH_FASTCALL,
     "the longest run of whole records from start (see the module's comment)"},
    {"verified_prefix", verified_prefix, METH_O,
     "bytes of whole version 2 records from the start whose checksums match"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "replicator.journal._verify",
    "Checksums and bounds of packed journal records (journal/native.py)", -1, methods,
};

PyMODINIT_FUNC PyInit__verify(void) { return PyModule_Create(&module); }
