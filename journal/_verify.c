/* Checksums of a packed run of journal records, in C (journal/native.py is its interface).

   verified_prefix(buf) -> int
       The length of the longest prefix of ``buf`` made of whole records of format
       version 2 (journal/records.py) whose XXH3-128 checksums match: 0 when the first
       record is not one. It vouches for nothing past that point and raises nothing:
       whatever follows (a version 1 record, a truncated one, a mismatch) is for the
       Python decoder to check and to name (``decode_records``), so every error a peer
       or a disk can cause is reported exactly as without this module.

   A receiver checks every record it is sent (one call per RECORDS frame, at most a few
   MiB); the Python check cost ~2.7 us of a 4 KiB record's ~4.8 us decoding
   (bench/RESULTS.md). */

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

static PyMethodDef methods[] = {
    {"verified_prefix", verified_prefix, METH_O,
     "bytes of whole version 2 records from the start whose checksums match"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "replicator.journal._verify",
    "Checksums of packed journal records (journal/native.py)", -1, methods,
};

PyMODINIT_FUNC PyInit__verify(void) { return PyModule_Create(&module); }
