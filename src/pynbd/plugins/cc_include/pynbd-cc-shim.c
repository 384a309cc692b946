/* The nbdkit side of pynbd's cc plugin: the functions an nbdkit plugin
 * calls (nbdkit_error, nbdkit_parse_size, nbdkit_add_extent, ...) and one
 * entry point, pynbd_cc_call, through which Python calls every callback of
 * the plugin. Compiled at run time by pynbd.plugins.cc and loaded
 * RTLD_GLOBAL before the plugin, so the plugin's undefined nbdkit_*
 * symbols resolve here, as they do against the nbdkit executable.
 *
 * Python is called back (through ctypes, which takes the GIL) only for
 * what needs it: messages, size and boolean parsing, passwords, shutdown
 * and disconnect. Everything on the data path stays in C.
 */

#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define NBDKIT_API_VERSION 2
#include "nbdkit-plugin.h"

/* ------------------------------------------------------------ Python's side */
enum { LOG_DEBUG_LEVEL = 0, LOG_ERROR_LEVEL = 1 };
static void (*py_log) (int level, const char *msg);
static int (*py_parse_size) (const char *str, int64_t *out);
static int (*py_parse_bool) (const char *str);
static int (*py_read_password) (const char *value, char *buf, size_t len);
static void (*py_shutdown) (void);
static void (*py_disconnect) (uint64_t id, int force);
static int debug_enabled;

void
pynbd_cc_init (void *log, void *parse_size, void *parse_bool, void *read_password,
               void *shutdown, void *disconnect, int debug)
{
  py_log = log;
  py_parse_size = parse_size;
  py_parse_bool = parse_bool;
  py_read_password = read_password;
  py_shutdown = shutdown;
  py_disconnect = disconnect;
  debug_enabled = debug;
}

/* ------------------------------------------------------------ one client */
struct pynbd_conn {
  struct nbdkit_plugin *p;
  void *handle;
  char *export_name;
  int is_tls;
  uint64_t id;
  const char *result;           /* default_export, export_description */
  struct sockaddr_storage peer;
  socklen_t peer_len;
  int64_t peer_pid, peer_uid, peer_gid;
};

struct pynbd_conn *
pynbd_cc_conn_new (struct nbdkit_plugin *p, const char *export_name, int is_tls, uint64_t id,
                   const void *peer, size_t peer_len, int64_t pid, int64_t uid, int64_t gid)
{
  struct pynbd_conn *c = calloc (1, sizeof *c);
  if (c == NULL)
    return NULL;
  c->p = p;
  c->export_name = strdup (export_name ? export_name : "");
  c->is_tls = is_tls;
  c->id = id;
  if (peer_len > sizeof c->peer)
    peer_len = sizeof c->peer;
  if (peer_len)
    memcpy (&c->peer, peer, peer_len);
  c->peer_len = peer_len;
  c->peer_pid = pid;
  c->peer_uid = uid;
  c->peer_gid = gid;
  return c;
}

void
pynbd_cc_conn_free (struct pynbd_conn *c)
{
  if (c) {
    free (c->export_name);
    free (c);
  }
}

const char *
pynbd_cc_conn_result (struct pynbd_conn *c)
{
  return c->result;
}

/* ------------------------------------------------------------ per thread */
static __thread struct pynbd_conn *current;
static __thread int in_call;
static __thread int last_err;
static __thread int error_called;
static __thread char last_msg[1024];

/* After a failed call: the errno for the client, the plugin's message, and
 * whether it called nbdkit_error at all. */
int
pynbd_cc_failure (char *msg, size_t len, int *called)
{
  snprintf (msg, len, "%s", last_msg);
  *called = error_called;
  return last_err;
}

/* ------------------------------------------------------------ messages */
void
nbdkit_verror (const char *fmt, va_list args)
{
  int saved = errno;
  vsnprintf (last_msg, sizeof last_msg, fmt, args);
  error_called = 1;
  if (!in_call && py_log)
    py_log (LOG_ERROR_LEVEL, last_msg);
  errno = saved;
}

void
nbdkit_error (const char *fmt, ...)
{
  va_list args;
  va_start (args, fmt);
  nbdkit_verror (fmt, args);
  va_end (args);
}

void
nbdkit_vdebug (const char *fmt, va_list args)
{
  char buf[1024];
  int saved = errno;
  if (debug_enabled && py_log) {
    vsnprintf (buf, sizeof buf, fmt, args);
    py_log (LOG_DEBUG_LEVEL, buf);
  }
  errno = saved;
}

void
nbdkit_debug (const char *fmt, ...)
{
  va_list args;
  va_start (args, fmt);
  nbdkit_vdebug (fmt, args);
  va_end (args);
}

void
nbdkit_set_error (int err)
{
  last_err = err;
}

/* ------------------------------------------------------------ parsing */
int64_t
nbdkit_parse_size (const char *str)
{
  int64_t size;
  if (str == NULL || py_parse_size == NULL || py_parse_size (str, &size) == -1) {
    nbdkit_error ("could not parse size string (%s)", str ? str : "(null)");
    return -1;
  }
  return size;
}

int
nbdkit_parse_bool (const char *str)
{
  int r = (str && py_parse_bool) ? py_parse_bool (str) : -1;
  if (r == -1)
    nbdkit_error ("could not decipher boolean (%s)", str ? str : "(null)");
  return r;
}

/* strtoimax/strtoumax with nbdkit's checks: the whole string, no
 * overflow, no negative numbers for unsigned types, then a range. */
static int
parse_signed (const char *what, const char *str, intmax_t min, intmax_t max, intmax_t *r)
{
  char *end;
  errno = 0;
  intmax_t v = strtoimax (str, &end, 0);
  if (str == end || *end != '\0') {
    nbdkit_error ("%s: could not parse number: \"%s\": trailing garbage", what, str);
    return -1;
  }
  if (errno == ERANGE || v < min || v > max) {
    nbdkit_error ("%s: could not parse number: \"%s\": %s", what, str, strerror (ERANGE));
    return -1;
  }
  *r = v;
  return 0;
}

static int
parse_unsigned (const char *what, const char *str, uintmax_t max, uintmax_t *r)
{
  char *end;
  const char *p = str;
  while (*p == ' ' || *p == '\t')
    p++;
  if (*p == '-') {
    nbdkit_error ("%s: could not parse number: \"%s\": negative numbers are not allowed",
                  what, str);
    return -1;
  }
  errno = 0;
  uintmax_t v = strtoumax (str, &end, 0);
  if (str == end || *end != '\0') {
    nbdkit_error ("%s: could not parse number: \"%s\": trailing garbage", what, str);
    return -1;
  }
  if (errno == ERANGE || v > max) {
    nbdkit_error ("%s: could not parse number: \"%s\": %s", what, str, strerror (ERANGE));
    return -1;
  }
  *r = v;
  return 0;
}

#define PARSE_SIGNED(name, type, min, max)                              \
  int name (const char *what, const char *str, type *r)                 \
  {                                                                     \
    intmax_t v;                                                         \
    if (parse_signed (what, str, min, max, &v) == -1)                   \
      return -1;                                                        \
    if (r)                                                              \
      *r = (type) v;                                                    \
    return 0;                                                           \
  }
#define PARSE_UNSIGNED(name, type, max)                                 \
  int name (const char *what, const char *str, type *r)                 \
  {                                                                     \
    uintmax_t v;                                                        \
    if (parse_unsigned (what, str, max, &v) == -1)                      \
      return -1;                                                        \
    if (r)                                                              \
      *r = (type) v;                                                    \
    return 0;                                                           \
  }

PARSE_SIGNED (nbdkit_parse_int, int, INT_MIN, INT_MAX)
PARSE_SIGNED (nbdkit_parse_int8_t, int8_t, INT8_MIN, INT8_MAX)
PARSE_SIGNED (nbdkit_parse_int16_t, int16_t, INT16_MIN, INT16_MAX)
PARSE_SIGNED (nbdkit_parse_int32_t, int32_t, INT32_MIN, INT32_MAX)
PARSE_SIGNED (nbdkit_parse_int64_t, int64_t, INT64_MIN, INT64_MAX)
PARSE_UNSIGNED (nbdkit_parse_unsigned, unsigned, UINT_MAX)
PARSE_UNSIGNED (nbdkit_parse_uint8_t, uint8_t, UINT8_MAX)
PARSE_UNSIGNED (nbdkit_parse_uint16_t, uint16_t, UINT16_MAX)
PARSE_UNSIGNED (nbdkit_parse_uint32_t, uint32_t, UINT32_MAX)
PARSE_UNSIGNED (nbdkit_parse_uint64_t, uint64_t, UINT64_MAX)

char *
nbdkit_absolute_path (const char *path)
{
  char *cwd, *ret;
  if (path == NULL || *path == '\0') {
    nbdkit_error ("cannot convert null or empty path to an absolute path");
    return NULL;
  }
  if (*path == '/') {
    ret = strdup (path);
    if (ret == NULL)
      nbdkit_error ("strdup: %m");
    return ret;
  }
  cwd = get_current_dir_name ();
  if (cwd == NULL) {
    nbdkit_error ("get_current_dir_name: %m");
    return NULL;
  }
  if (asprintf (&ret, "%s/%s", cwd, path) == -1) {
    nbdkit_error ("asprintf: %m");
    ret = NULL;
  }
  free (cwd);
  return ret;
}

char *
nbdkit_realpath (const char *path)
{
  char *ret;
  if (path == NULL || *path == '\0') {
    nbdkit_error ("cannot resolve a null or empty path");
    return NULL;
  }
  ret = realpath (path, NULL);
  if (ret == NULL)
    nbdkit_error ("realpath: %s: %m", path);
  return ret;
}

int
nbdkit_read_password (const char *value, char **password)
{
  char buf[4096];
  int n = py_read_password ? py_read_password (value, buf, sizeof buf) : -1;
  *password = NULL;
  if (n < 0) {
    nbdkit_error ("could not read the password given as \"%s\"", value);
    return -1;
  }
  *password = strndup (buf, (size_t) n);
  if (*password == NULL) {
    nbdkit_error ("strndup: %m");
    return -1;
  }
  return 0;
}

int
nbdkit_stdio_safe (void)
{
  return 1;
}

/* Interned strings live as long as the server (nbdkit frees some sooner;
 * none is ever freed by the plugin). */
const char *
nbdkit_strndup_intern (const char *str, size_t n)
{
  char *s = strndup (str, n);
  if (s == NULL)
    nbdkit_error ("strndup: %m");
  return s;
}

const char *
nbdkit_strdup_intern (const char *str)
{
  return nbdkit_strndup_intern (str, SIZE_MAX);
}

const char *
nbdkit_vprintf_intern (const char *fmt, va_list args)
{
  char *s;
  if (vasprintf (&s, fmt, args) == -1) {
    nbdkit_error ("vasprintf: %m");
    return NULL;
  }
  return s;
}

const char *
nbdkit_printf_intern (const char *fmt, ...)
{
  va_list args;
  const char *s;
  va_start (args, fmt);
  s = nbdkit_vprintf_intern (fmt, args);
  va_end (args);
  return s;
}

/* ------------------------------------------------------------ extents */
struct pynbd_extent {
  uint64_t offset, length;
  uint32_t type;
};

struct nbdkit_extents {
  uint64_t start, end, next;
  size_t n, cap;
  struct pynbd_extent *e;
};

struct nbdkit_extents *
pynbd_cc_extents_new (uint64_t start, uint64_t end)
{
  struct nbdkit_extents *x = calloc (1, sizeof *x);
  if (x) {
    x->start = start;
    x->end = end;
  }
  return x;
}

void
pynbd_cc_extents_free (struct nbdkit_extents *x)
{
  if (x) {
    free (x->e);
    free (x);
  }
}

size_t
pynbd_cc_extents_count (const struct nbdkit_extents *x)
{
  return x->n;
}

const struct pynbd_extent *
pynbd_cc_extents_array (const struct nbdkit_extents *x)
{
  return x->e;
}

int
nbdkit_add_extent (struct nbdkit_extents *x, uint64_t offset, uint64_t length, uint32_t type)
{
  if (length == 0 || offset >= x->end || x->n >= 1048576)
    return 0;
  if (offset + length > x->end)
    length = x->end - offset;
  if (x->n == 0 && offset + length <= x->start)
    return 0;
  if (x->n == 0 && offset > x->start) {
    nbdkit_error ("nbdkit_add_extent: first extent must not be > start (%" PRIu64 ")", x->start);
    errno = ERANGE;
    return -1;
  }
  if (x->n > 0 && offset != x->next) {
    nbdkit_error ("nbdkit_add_extent: extents must be added in ascending order and "
                  "must be contiguous");
    errno = ERANGE;
    return -1;
  }
  x->next = offset + length;
  if (offset < x->start) {
    length -= x->start - offset;
    offset = x->start;
  }
  if (x->n > 0 && x->e[x->n - 1].type == type) {
    x->e[x->n - 1].length += length;
    return 0;
  }
  if (x->n == x->cap) {
    size_t cap = x->cap ? 2 * x->cap : 16;
    struct pynbd_extent *e = realloc (x->e, cap * sizeof *e);
    if (e == NULL) {
      nbdkit_error ("nbdkit_add_extent: realloc: %m");
      return -1;
    }
    x->e = e;
    x->cap = cap;
  }
  x->e[x->n++] = (struct pynbd_extent) { offset, length, type };
  return 0;
}

/* ------------------------------------------------------------ exports */
struct nbdkit_exports {
  size_t n;
  int use_default;
  char *names[10000];
  char *descriptions[10000];
};

struct nbdkit_exports *
pynbd_cc_exports_new (void)
{
  return calloc (1, sizeof (struct nbdkit_exports));
}

void
pynbd_cc_exports_free (struct nbdkit_exports *x)
{
  if (x) {
    for (size_t i = 0; i < x->n; i++) {
      free (x->names[i]);
      free (x->descriptions[i]);
    }
    free (x);
  }
}

/* The i'th export (NULL name: the default export), or -1 past the end. */
int
pynbd_cc_exports_get (const struct nbdkit_exports *x, size_t i,
                      const char **name, const char **description)
{
  if (i >= x->n)
    return -1;
  *name = x->names[i];
  *description = x->descriptions[i];
  return 0;
}

static int
add_export (struct nbdkit_exports *x, const char *name, const char *description)
{
  if (x->n >= sizeof x->names / sizeof x->names[0]) {
    nbdkit_error ("nbdkit_add_export: too many exports");
    errno = EINVAL;
    return -1;
  }
  x->names[x->n] = name ? strdup (name) : NULL;
  x->descriptions[x->n] = description ? strdup (description) : NULL;
  x->n++;
  return 0;
}

int
nbdkit_add_export (struct nbdkit_exports *x, const char *name, const char *description)
{
  if (name == NULL || strlen (name) > 4096) {
    nbdkit_error ("nbdkit_add_export: export name must be a string of at most 4096 bytes");
    errno = EINVAL;
    return -1;
  }
  return add_export (x, name, description);
}

int
nbdkit_use_default_export (struct nbdkit_exports *x)
{
  if (x->use_default)
    return 0;
  x->use_default = 1;
  return add_export (x, NULL, NULL);
}

/* ------------------------------------------------------------ the client */
const char *
nbdkit_export_name (void)
{
  if (current == NULL) {
    nbdkit_error ("no connection in this thread");
    return NULL;
  }
  return current->export_name;
}

int
nbdkit_is_tls (void)
{
  if (current == NULL) {
    nbdkit_error ("no connection in this thread");
    return -1;
  }
  return current->is_tls;
}

int
nbdkit_peer_name (struct sockaddr *addr, socklen_t *addrlen)
{
  if (current == NULL || current->peer_len == 0) {
    nbdkit_error ("nbdkit_peer_name: the peer's address is not known");
    return -1;
  }
  if (*addrlen < current->peer_len) {
    nbdkit_error ("nbdkit_peer_name: the address buffer is too small");
    return -1;
  }
  memcpy (addr, &current->peer, current->peer_len);
  *addrlen = current->peer_len;
  return 0;
}

static int64_t
peer_credential (const char *fn, int64_t value)
{
  if (current == NULL || value < 0) {
    nbdkit_error ("%s: not a Unix domain socket connection", fn);
    return -1;
  }
  return value;
}

int64_t
nbdkit_peer_pid (void)
{
  return peer_credential ("nbdkit_peer_pid", current ? current->peer_pid : -1);
}

int64_t
nbdkit_peer_uid (void)
{
  return peer_credential ("nbdkit_peer_uid", current ? current->peer_uid : -1);
}

int64_t
nbdkit_peer_gid (void)
{
  return peer_credential ("nbdkit_peer_gid", current ? current->peer_gid : -1);
}

int
nbdkit_nanosleep (unsigned sec, unsigned nsec)
{
  struct timespec ts = { .tv_sec = sec + nsec / 1000000000, .tv_nsec = nsec % 1000000000 };
  while (nanosleep (&ts, &ts) == -1) {
    if (errno != EINTR) {
      nbdkit_error ("nanosleep: %m");
      return -1;
    }
  }
  return 0;
}

void
nbdkit_shutdown (void)
{
  if (py_shutdown)
    py_shutdown ();
}

void
nbdkit_disconnect (int force)
{
  if (current && py_disconnect)
    py_disconnect (current->id, force);
}

/* ------------------------------------------------------------ loading */
/* Call plugin_init and copy what it returned into a full-size struct (a
 * plugin built against an older header has fewer fields: the rest stay
 * NULL). Returns NULL and sets *api to what the plugin declared when it
 * is not version 1 or 2. */
struct nbdkit_plugin *
pynbd_cc_plugin_init (struct nbdkit_plugin *(*init) (void), int *api)
{
  struct nbdkit_plugin *p = init ();
  struct nbdkit_plugin *copy;
  size_t size;

  *api = 0;
  if (p == NULL)
    return NULL;
  *api = p->_api_version;
  if (p->_api_version < 1 || p->_api_version > 2)
    return NULL;
  copy = calloc (1, sizeof *copy);
  if (copy == NULL)
    return NULL;
  size = p->_struct_size < sizeof *copy ? p->_struct_size : sizeof *copy;
  memcpy (copy, p, size);
  copy->_struct_size = size;
  return copy;
}

enum {
  OP_LOAD, OP_UNLOAD, OP_DUMP_PLUGIN, OP_CONFIG, OP_CONFIG_COMPLETE, OP_THREAD_MODEL,
  OP_GET_READY, OP_AFTER_FORK, OP_CLEANUP, OP_PRECONNECT, OP_LIST_EXPORTS,
  OP_DEFAULT_EXPORT, OP_OPEN, OP_CLOSE, OP_EXPORT_DESCRIPTION, OP_GET_SIZE,
  OP_BLOCK_SIZE, OP_CAN_WRITE, OP_CAN_FLUSH, OP_IS_ROTATIONAL, OP_CAN_TRIM,
  OP_CAN_ZERO, OP_CAN_FAST_ZERO, OP_CAN_FUA, OP_CAN_MULTI_CONN, OP_CAN_EXTENTS,
  OP_CAN_CACHE, OP_PREAD, OP_PWRITE, OP_FLUSH, OP_TRIM, OP_ZERO, OP_CACHE, OP_EXTENTS,
};

static void *
callback (const struct nbdkit_plugin *p, int op)
{
  int v1 = p->_api_version == 1;
  switch (op) {
  case OP_LOAD: return p->load;
  case OP_UNLOAD: return p->unload;
  case OP_DUMP_PLUGIN: return p->dump_plugin;
  case OP_CONFIG: return p->config;
  case OP_CONFIG_COMPLETE: return p->config_complete;
  case OP_THREAD_MODEL: return p->thread_model;
  case OP_GET_READY: return p->get_ready;
  case OP_AFTER_FORK: return p->after_fork;
  case OP_CLEANUP: return p->cleanup;
  case OP_PRECONNECT: return p->preconnect;
  case OP_LIST_EXPORTS: return p->list_exports;
  case OP_DEFAULT_EXPORT: return p->default_export;
  case OP_OPEN: return p->open;
  case OP_CLOSE: return p->close;
  case OP_EXPORT_DESCRIPTION: return p->export_description;
  case OP_GET_SIZE: return p->get_size;
  case OP_BLOCK_SIZE: return p->block_size;
  case OP_CAN_WRITE: return p->can_write;
  case OP_CAN_FLUSH: return p->can_flush;
  case OP_IS_ROTATIONAL: return p->is_rotational;
  case OP_CAN_TRIM: return p->can_trim;
  case OP_CAN_ZERO: return p->can_zero;
  case OP_CAN_FAST_ZERO: return p->can_fast_zero;
  case OP_CAN_FUA: return p->can_fua;
  case OP_CAN_MULTI_CONN: return p->can_multi_conn;
  case OP_CAN_EXTENTS: return p->can_extents;
  case OP_CAN_CACHE: return p->can_cache;
  case OP_PREAD: return v1 ? (void *) p->_pread_v1 : (void *) p->pread;
  case OP_PWRITE: return v1 ? (void *) p->_pwrite_v1 : (void *) p->pwrite;
  case OP_FLUSH: return v1 ? (void *) p->_flush_v1 : (void *) p->flush;
  case OP_TRIM: return v1 ? (void *) p->_trim_v1 : (void *) p->trim;
  case OP_ZERO: return v1 ? (void *) p->_zero_v1 : (void *) p->zero;
  case OP_CACHE: return p->cache;
  case OP_EXTENTS: return p->extents;
  default: return NULL;
  }
}

int
pynbd_cc_has (const struct nbdkit_plugin *p, int op)
{
  return callback (p, op) != NULL;
}

/* Strings of the plugin struct: 0 name, 1 longname, 2 version, 3 description,
 * 4 config_help, 5 magic_config_key. */
const char *
pynbd_cc_string (const struct nbdkit_plugin *p, int which)
{
  const char *fields[] = { p->name, p->longname, p->version, p->description,
                           p->config_help, p->magic_config_key };
  return which >= 0 && which < 6 ? fields[which] : NULL;
}

static int64_t
dispatch (struct pynbd_conn *c, int op, uint64_t count, uint64_t offset, uint32_t flags,
          void *ptr, const char *s1, const char *s2)
{
  const struct nbdkit_plugin *p = c->p;
  void *h = c->handle;
  int v1 = p->_api_version == 1;
  uint32_t n = (uint32_t) count;
  const char *s;

  switch (op) {
  case OP_LOAD: p->load (); return 0;
  case OP_UNLOAD: p->unload (); return 0;
  case OP_DUMP_PLUGIN: p->dump_plugin (); return 0;
  case OP_CLEANUP: p->cleanup (); return 0;
  case OP_CONFIG: return p->config (s1, s2);
  case OP_CONFIG_COMPLETE: return p->config_complete ();
  case OP_THREAD_MODEL: return p->thread_model ();
  case OP_GET_READY: return p->get_ready ();
  case OP_AFTER_FORK: return p->after_fork ();
  case OP_PRECONNECT: return p->preconnect ((int) flags);
  case OP_LIST_EXPORTS: return p->list_exports ((int) flags, c->is_tls, ptr);
  case OP_DEFAULT_EXPORT:
    c->result = p->default_export ((int) flags, c->is_tls);
    return c->result ? 0 : -1;
  case OP_OPEN:
    c->handle = p->open ((int) flags);
    return c->handle ? 0 : -1;
  case OP_CLOSE: p->close (h); return 0;
  case OP_EXPORT_DESCRIPTION:
    s = p->export_description (h);
    c->result = s;
    return s ? 0 : -1;
  case OP_GET_SIZE: return p->get_size (h);
  case OP_BLOCK_SIZE: {
    uint32_t *sizes = ptr;
    return p->block_size (h, &sizes[0], &sizes[1], &sizes[2]);
  }
  case OP_CAN_WRITE: return p->can_write (h);
  case OP_CAN_FLUSH: return p->can_flush (h);
  case OP_IS_ROTATIONAL: return p->is_rotational (h);
  case OP_CAN_TRIM: return p->can_trim (h);
  case OP_CAN_ZERO: return p->can_zero (h);
  case OP_CAN_FAST_ZERO: return p->can_fast_zero (h);
  case OP_CAN_FUA: return p->can_fua (h);
  case OP_CAN_MULTI_CONN: return p->can_multi_conn (h);
  case OP_CAN_EXTENTS: return p->can_extents (h);
  case OP_CAN_CACHE: return p->can_cache (h);
  case OP_PREAD:
    return v1 ? p->_pread_v1 (h, ptr, n, offset) : p->pread (h, ptr, n, offset, flags);
  case OP_PWRITE:
    return v1 ? p->_pwrite_v1 (h, ptr, n, offset) : p->pwrite (h, ptr, n, offset, flags);
  case OP_FLUSH: return v1 ? p->_flush_v1 (h) : p->flush (h, flags);
  case OP_TRIM: return v1 ? p->_trim_v1 (h, n, offset) : p->trim (h, n, offset, flags);
  case OP_ZERO:
    return v1 ? p->_zero_v1 (h, n, offset, (flags & NBDKIT_FLAG_MAY_TRIM) != 0)
              : p->zero (h, n, offset, flags);
  case OP_CACHE: return p->cache (h, n, offset, flags);
  case OP_EXTENTS: return p->extents (h, n, offset, flags, ptr);
  default:
    nbdkit_error ("pynbd: unknown callback %d", op);
    return -1;
  }
}

/* Run one callback for connection c (or for the plugin, with a connection
 * that has no handle). On -1, pynbd_cc_failure tells the errno: the one
 * the plugin set with nbdkit_set_error, else errno when the plugin says it
 * is preserved, else EIO. */
int64_t
pynbd_cc_call (struct pynbd_conn *c, int op, uint64_t count, uint64_t offset, uint32_t flags,
               void *ptr, const char *s1, const char *s2)
{
  int64_t r;
  struct pynbd_conn *saved = current;

  if (callback (c->p, op) == NULL) {
    last_err = ENOTSUP;
    snprintf (last_msg, sizeof last_msg, "the plugin has no such callback");
    error_called = 1;
    return -1;
  }
  current = c;
  in_call = 1;
  last_err = 0;
  error_called = 0;
  last_msg[0] = '\0';
  errno = 0;
  r = dispatch (c, op, count, offset, flags, ptr, s1, s2);
  if (r == -1 && last_err == 0)
    last_err = (c->p->errno_is_preserved && errno) ? errno : EIO;
  in_call = 0;
  current = saved;
  return r;
}
