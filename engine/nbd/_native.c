/* The NBD shim's hot path for small WRITEs, in C (engine/nbd/native.py is its interface).

   Three functions over a run of complete NBD WRITE requests as received
   (request header 28 bytes big endian, then the payload):

   scan_writes(buf, pos, end, max_length, file_size, max_count) -> (count, consumed, payload)
       How many requests from ``pos`` qualify for the batch path: each a WRITE with no
       flags, 1..max_length bytes, whole within ``end``, ending at or before ``file_size``.
       Stops at the first that does not (the per-request path takes it).
   encode_writes(batch, count, name, lsn, ts_ns) -> (records, replies)
       The journal records of the ``count`` requests at the start of ``batch`` (format
       version 2, journal/records.py, byte for byte: LSNs from ``lsn``, every record
       stamped ``ts_ns``, checksum XXH3-128) and their NBD simple replies (error 0).
   pwrite_records(fd, records, count, name_len) -> [(index, errno), ...]
       Writes each record's payload into ``fd`` at the record's offset (whole: a short
       write goes on; EINTR is retried); the records whose write failed.

   Nothing here blocks for long: a batch of small writes into the page cache, in the loop
   thread, with the GIL held (as the per-request path does). */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>

#define XXH_INLINE_ALL
#include <xxhash.h>

#define REQUEST_MAGIC 0x25609513u
#define REPLY_MAGIC 0x67446698u
#define REQUEST_SIZE 28
#define REPLY_SIZE 16
#define CMD_WRITE 1
#define RECORD_HEADER 58
#define CHECKED_HEADER 42
#define RECORD_VERSION 2
#define RECORD_WRITE 1
#define MAX_NAME 4096

static uint16_t be16(const unsigned char *p) { return (uint16_t)((p[0] << 8) | p[1]); }

static uint32_t be32(const unsigned char *p) {
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

static uint64_t be64(const unsigned char *p) {
    return ((uint64_t)be32(p) << 32) | be32(p + 4);
}

static void put_le16(unsigned char *p, uint16_t v) {
    p[0] = (unsigned char)v;
    p[1] = (unsigned char)(v >> 8);
}

static void put_le32(unsigned char *p, uint32_t v) {
    for (int i = 0; i < 4; i++) p[i] = (unsigned char)(v >> (8 * i));
}

static void put_le64(unsigned char *p, uint64_t v) {
    for (int i = 0; i < 8; i++) p[i] = (unsigned char)(v >> (8 * i));
}

static uint64_t le64(const unsigned char *p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}

static uint32_t le32(const unsigned char *p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

/* Whether the request at p (with `avail` bytes from p) qualifies; its payload length. */
static int qualifies(const unsigned char *p, Py_ssize_t avail, unsigned long long max_length,
                     unsigned long long file_size, uint32_t *length) {
    if (avail < REQUEST_SIZE) return 0;
    if (be32(p) != REQUEST_MAGIC || be16(p + 4) != 0 || be16(p + 6) != CMD_WRITE) return 0;
    uint64_t offset = be64(p + 16);
    uint32_t len = be32(p + 24);
    if (len == 0 || len > max_length || (Py_ssize_t)len > avail - REQUEST_SIZE) return 0;
    if (len > file_size || offset > file_size - len) return 0;
    *length = len;
    return 1;
}

static PyObject *scan_writes(PyObject *self, PyObject *args) {
    Py_buffer buf;
    Py_ssize_t pos, end, max_count;
    unsigned long long max_length, file_size;
    if (!PyArg_ParseTuple(args, "y*nnKKn", &buf, &pos, &end, &max_length, &file_size,
                          &max_count))
        return NULL;
    if (pos < 0 || end < pos || end > buf.len) {
        PyBuffer_Release(&buf);
        PyErr_SetString(PyExc_ValueError, "scan_writes: pos and end must lie within the buffer");
        return NULL;
    }
    const unsigned char *base = (const unsigned char *)buf.buf;
    Py_ssize_t at = pos, count = 0;
    unsigned long long payload = 0;
    uint32_t length;
    while (count < max_count && qualifies(base + at, end - at, max_length, file_size, &length)) {
        at += REQUEST_SIZE + length;
        payload += length;
        count++;
    }
    PyBuffer_Release(&buf);
    return Py_BuildValue("nnK", count, at - pos, payload);
}

static PyObject *encode_writes(PyObject *self, PyObject *args) {
    Py_buffer batch, name;
    Py_ssize_t count;
    unsigned long long lsn;
    long long ts_ns;
    PyObject *records = NULL, *replies = NULL;
    if (!PyArg_ParseTuple(args, "y*ny*KL", &batch, &count, &name, &lsn, &ts_ns)) return NULL;
    const unsigned char *src = (const unsigned char *)batch.buf;
    Py_ssize_t at = 0, size = 0;
    uint32_t length;
    if (count < 0 || name.len <= 0 || name.len > MAX_NAME) {
        PyErr_SetString(PyExc_ValueError, "encode_writes: a count and a volume name of 1..4096 bytes");
        goto done;
    }
    for (Py_ssize_t i = 0; i < count; i++) { /* checked again: the input is the caller's */
        if (!qualifies(src + at, batch.len - at, UINT32_MAX, UINT64_MAX, &length)) {
            PyErr_Format(PyExc_ValueError, "encode_writes: request %zd is not a plain WRITE", i);
            goto done;
        }
        at += REQUEST_SIZE + length;
        size += RECORD_HEADER + name.len + length;
    }
    records = PyBytes_FromStringAndSize(NULL, size);
    replies = PyBytes_FromStringAndSize(NULL, count * REPLY_SIZE);
    if (records == NULL || replies == NULL) goto done;
    unsigned char *out = (unsigned char *)PyBytes_AS_STRING(records);
    unsigned char *rep = (unsigned char *)PyBytes_AS_STRING(replies);
    XXH3_state_t state;
    at = 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        const unsigned char *req = src + at;
        length = be32(req + 24);
        const unsigned char *data = req + REQUEST_SIZE;
        out[0] = 'R';
        out[1] = 'J';
        out[2] = RECORD_VERSION;
        out[3] = RECORD_WRITE;
        put_le16(out + 4, (uint16_t)name.len);
        put_le32(out + 6, length);
        put_le64(out + 10, lsn + (uint64_t)i);
        put_le64(out + 18, (uint64_t)ts_ns);
        put_le64(out + 26, be64(req + 16));
        put_le64(out + 34, length);
        XXH3_128bits_reset(&state);
        XXH3_128bits_update(&state, out, CHECKED_HEADER);
        XXH3_128bits_update(&state, name.buf, (size_t)name.len);
        XXH3_128bits_update(&state, data, length);
        XXH128_canonicalFromHash((XXH128_canonical_t *)(out + CHECKED_HEADER),
                                 XXH3_128bits_digest(&state));
        memcpy(out + RECORD_HEADER, name.buf, (size_t)name.len);
        memcpy(out + RECORD_HEADER + name.len, data, length);
        out += RECORD_HEADER + name.len + length;
        rep[0] = (unsigned char)(REPLY_MAGIC >> 24);
        rep[1] = (unsigned char)(REPLY_MAGIC >> 16);
        rep[2] = (unsigned char)(REPLY_MAGIC >> 8);
        rep[3] = (unsigned char)REPLY_MAGIC;
        memset(rep + 4, 0, 4); /* error 0 */
        memcpy(rep + 8, req + 8, 8); /* the handle, as the client sent it */
        rep += REPLY_SIZE;
        at += REQUEST_SIZE + length;
    }
    PyBuffer_Release(&batch);
    PyBuffer_Release(&name);
    PyObject *result = PyTuple_Pack(2, records, replies);
    Py_DECREF(records);
    Py_DECREF(replies);
    return result;
done:
    Py_XDECREF(records);
    Py_XDECREF(replies);
    PyBuffer_Release(&batch);
    PyBuffer_Release(&name);
    return NULL;
}

static PyObject *pwrite_records(PyObject *self, PyObject *args) {
    int fd;
    Py_buffer records;
    Py_ssize_t count, name_len;
    if (!PyArg_ParseTuple(args, "iy*nn", &fd, &records, &count, &name_len)) return NULL;
    PyObject *failed = PyList_New(0);
    if (failed == NULL) {
        PyBuffer_Release(&records);
        return NULL;
    }
    const unsigned char *base = (const unsigned char *)records.buf;
    Py_ssize_t at = 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        if (records.len - at < RECORD_HEADER + name_len ||
            records.len - at - RECORD_HEADER - name_len < (Py_ssize_t)le32(base + at + 6)) {
            PyErr_SetString(PyExc_ValueError, "pwrite_records: records shorter than their count");
            goto fail;
        }
        uint32_t length = le32(base + at + 6);
        uint64_t offset = le64(base + at + 26);
        const unsigned char *data = base + at + RECORD_HEADER + name_len;
        uint32_t done = 0;
        while (done < length) {
            ssize_t n = pwrite(fd, data + done, length - done, (off_t)(offset + done));
            if (n < 0 && errno == EINTR) continue;
            if (n <= 0) {
                PyObject *item = Py_BuildValue("(ni)", i, n < 0 ? errno : EIO);
                if (item == NULL || PyList_Append(failed, item) < 0) {
                    Py_XDECREF(item);
                    goto fail;
                }
                Py_DECREF(item);
                break;
            }
            done += (uint32_t)n;
        }
        at += RECORD_HEADER + name_len + length;
    }
    PyBuffer_Release(&records);
    return failed;
fail:
    Py_DECREF(failed);
    PyBuffer_Release(&records);
    return NULL;
}

static PyMethodDef methods[] = {
    {"scan_writes", scan_writes, METH_VARARGS, "count the plain WRITEs at pos that qualify"},
    {"encode_writes", encode_writes, METH_VARARGS, "journal records and replies of WRITEs"},
    {"pwrite_records", pwrite_records, METH_VARARGS, "write records' payloads into a file"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "replicator.engine.nbd._native",
    "The NBD shim's hot path for small WRITEs (see engine/nbd/native.py).", -1, methods,
};

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&module); }
