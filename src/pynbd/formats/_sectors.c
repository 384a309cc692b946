/* pynbd.formats._sectors: the luks filter's sector loop in C.
 *
 * Disk encryption restarts the cipher at every sector with that sector's IV,
 * so a 1 MiB request is 2,048 restarts. From Python each restart is two
 * libcrypto calls through cffi (about 1 us); here the same two calls run in
 * a C loop with the interpreter lock released, so a run of sectors costs what
 * the AES work costs and other threads go on meanwhile.
 *
 * The module links against nothing: formats/evp.py loads the system's
 * libcrypto and hands over the addresses of EVP_CipherInit_ex and
 * EVP_CipherUpdate with a keyed EVP_CIPHER_CTX, so no OpenSSL headers or
 * development libraries are needed to build it. It is an optional
 * extension: where it is not built, evp.py loops in Python.
 *
 *     run(init, update, ctx, buf, size, ivs) -> None
 *         init, update, ctx: addresses (int); buf: a writable buffer of whole
 *         ``size``-byte sectors, transformed in place; ivs: 16 bytes per sector.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

typedef int (*init_fn)(void *ctx, const void *cipher, void *impl, const unsigned char *key,
                       const unsigned char *iv, int enc);
typedef int (*update_fn)(void *ctx, unsigned char *out, int *outl, const unsigned char *in, int inl);

static PyObject *
run(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void) self;
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "run() takes 6 arguments: init, update, ctx, buf, size, ivs");
        return NULL;
    }
    void *init_p = PyLong_AsVoidPtr(args[0]);
    void *update_p = PyLong_AsVoidPtr(args[1]);
    void *ctx = PyLong_AsVoidPtr(args[2]);
    Py_ssize_t size = PyLong_AsSsize_t(args[4]);
    if (PyErr_Occurred())
        return NULL;
    if (init_p == NULL || update_p == NULL || ctx == NULL || size <= 0 || size > INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "run(): null address or bad sector size");
        return NULL;
    }
    Py_buffer buf, ivs;
    if (PyObject_GetBuffer(args[3], &buf, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0)
        return NULL;
    if (PyObject_GetBuffer(args[5], &ivs, PyBUF_C_CONTIGUOUS) < 0) {
        PyBuffer_Release(&buf);
        return NULL;
    }
    Py_ssize_t sectors = buf.len / size;
    if (buf.len % size != 0 || ivs.len < 16 * sectors) {
        PyBuffer_Release(&ivs);
        PyBuffer_Release(&buf);
        PyErr_SetString(PyExc_ValueError, "run(): not whole sectors, or too few IVs");
        return NULL;
    }
    init_fn init = (init_fn) init_p;
    update_fn update = (update_fn) update_p;
    unsigned char *data = buf.buf;
    const unsigned char *iv = ivs.buf;
    int failed = 0;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < sectors; i++) {
        int done;
        unsigned char *sector = data + i * size;
        if (init(ctx, NULL, NULL, NULL, iv + 16 * i, -1) != 1 ||
            update(ctx, sector, &done, sector, (int) size) != 1) {
            failed = 1;
            break;
        }
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&ivs);
    PyBuffer_Release(&buf);
    if (failed) {
        PyErr_SetString(PyExc_OSError, "libcrypto refused a sector");
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"run", (PyCFunction) (void (*)(void)) run, METH_FASTCALL,
     "run(init, update, ctx, buf, size, ivs): each size-byte sector of buf through the cipher "
     "context with its own 16-byte IV, in place."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_sectors", "The luks filter's sector loop in C (see formats/evp.py).",
    -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__sectors(void)
{
    return PyModule_Create(&module);
}
