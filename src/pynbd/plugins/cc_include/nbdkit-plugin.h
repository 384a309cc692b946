/* nbdkit-plugin.h as provided by pynbd (pynbd serve cc / pynbd serve PLUGIN.so).
 *
 * Written from nbdkit-plugin(3). The layout of struct nbdkit_plugin is
 * nbdkit's binary interface for API versions 1 and 2: a plugin compiled
 * against this header loads in nbdkit, and a plugin built against nbdkit's
 * header loads in pynbd. Fields are only ever appended at the end; the loader
 * reads _struct_size to know how many a plugin has.
 */

#ifndef NBDKIT_PLUGIN_H
#define NBDKIT_PLUGIN_H

#include <errno.h>
#include <stdarg.h>
#include <stdint.h>
#include <sys/socket.h>

#ifdef __cplusplus
extern "C" {
#endif

#define NBDKIT_VERSION_MAJOR 1
#define NBDKIT_VERSION_MINOR 32
#define NBDKIT_VERSION_MICRO 5
#define NBDKIT_VERSION_STRING "1.32.5"

#ifndef NBDKIT_API_VERSION
#define NBDKIT_API_VERSION 1
#elif (NBDKIT_API_VERSION - 0) < 1 || NBDKIT_API_VERSION > 2
#error "pynbd: NBDKIT_API_VERSION must be 1 or 2"
#endif

/* Thread models: how much concurrency the plugin tolerates. */
#define NBDKIT_THREAD_MODEL_SERIALIZE_CONNECTIONS  0
#define NBDKIT_THREAD_MODEL_SERIALIZE_ALL_REQUESTS 1
#define NBDKIT_THREAD_MODEL_SERIALIZE_REQUESTS     2
#define NBDKIT_THREAD_MODEL_PARALLEL               3

/* Request flags (API version 2 callbacks). */
#define NBDKIT_FLAG_MAY_TRIM  (1 << 0)
#define NBDKIT_FLAG_FUA       (1 << 1)
#define NBDKIT_FLAG_REQ_ONE   (1 << 2)
#define NBDKIT_FLAG_FAST_ZERO (1 << 3)

/* What can_fua and can_cache return. */
#define NBDKIT_FUA_NONE     0
#define NBDKIT_FUA_EMULATE  1
#define NBDKIT_FUA_NATIVE   2
#define NBDKIT_CACHE_NONE    0
#define NBDKIT_CACHE_EMULATE 1
#define NBDKIT_CACHE_NATIVE  2

/* Extent types for nbdkit_add_extent. */
#define NBDKIT_EXTENT_HOLE (1 << 0)
#define NBDKIT_EXTENT_ZERO (1 << 1)

/* A handle for plugins that keep no per-connection state. */
#define NBDKIT_HANDLE_NOT_NEEDED (&errno)

#define NBDKIT_DLL_PUBLIC __attribute__ ((__visibility__ ("default")))
#define NBDKIT_PRINTF(fmt, args) __attribute__ ((__format__ (__printf__, fmt, args)))

struct nbdkit_extents;
struct nbdkit_exports;

struct nbdkit_plugin {
  /* Filled in by NBDKIT_REGISTER_PLUGIN; do not set them yourself. */
  uint64_t _struct_size;
  int _api_version;
  int _thread_model;

  const char *name;
  const char *longname;
  const char *version;
  const char *description;

  void (*load) (void);
  void (*unload) (void);

  int (*config) (const char *key, const char *value);
  int (*config_complete) (void);
  const char *config_help;

  void *(*open) (int readonly);
  void (*close) (void *handle);

  int64_t (*get_size) (void *handle);

  int (*can_write) (void *handle);
  int (*can_flush) (void *handle);
  int (*is_rotational) (void *handle);
  int (*can_trim) (void *handle);

  /* The data callbacks of API version 1 (no flags). */
#if NBDKIT_API_VERSION == 1
  int (*pread) (void *handle, void *buf, uint32_t count, uint64_t offset);
  int (*pwrite) (void *handle, const void *buf, uint32_t count, uint64_t offset);
  int (*flush) (void *handle);
  int (*trim) (void *handle, uint32_t count, uint64_t offset);
  int (*zero) (void *handle, uint32_t count, uint64_t offset, int may_trim);
#else
  int (*_pread_v1) (void *, void *, uint32_t, uint64_t);
  int (*_pwrite_v1) (void *, const void *, uint32_t, uint64_t);
  int (*_flush_v1) (void *);
  int (*_trim_v1) (void *, uint32_t, uint64_t);
  int (*_zero_v1) (void *, uint32_t, uint64_t, int);
#endif

  int errno_is_preserved;

  void (*dump_plugin) (void);

  int (*can_zero) (void *handle);
  int (*can_fua) (void *handle);

  /* The data callbacks of API version 2 (with flags). */
#if NBDKIT_API_VERSION == 1
  int (*_pread_v2) (void *, void *, uint32_t, uint64_t, uint32_t);
  int (*_pwrite_v2) (void *, const void *, uint32_t, uint64_t, uint32_t);
  int (*_flush_v2) (void *, uint32_t);
  int (*_trim_v2) (void *, uint32_t, uint64_t, uint32_t);
  int (*_zero_v2) (void *, uint32_t, uint64_t, uint32_t);
#else
  int (*pread) (void *handle, void *buf, uint32_t count, uint64_t offset, uint32_t flags);
  int (*pwrite) (void *handle, const void *buf, uint32_t count, uint64_t offset,
                 uint32_t flags);
  int (*flush) (void *handle, uint32_t flags);
  int (*trim) (void *handle, uint32_t count, uint64_t offset, uint32_t flags);
  int (*zero) (void *handle, uint32_t count, uint64_t offset, uint32_t flags);
#endif

  const char *magic_config_key;

  int (*can_multi_conn) (void *handle);

  int (*can_extents) (void *handle);
  int (*extents) (void *handle, uint32_t count, uint64_t offset, uint32_t flags,
                  struct nbdkit_extents *extents);

  int (*can_cache) (void *handle);
  int (*cache) (void *handle, uint32_t count, uint64_t offset, uint32_t flags);

  int (*thread_model) (void);

  int (*can_fast_zero) (void *handle);

  int (*preconnect) (int readonly);

  int (*get_ready) (void);
  int (*after_fork) (void);

  int (*list_exports) (int readonly, int is_tls, struct nbdkit_exports *exports);
  const char *(*default_export) (int readonly, int is_tls);
  const char *(*export_description) (void *handle);

  void (*cleanup) (void);

  int (*block_size) (void *handle, uint32_t *minimum, uint32_t *preferred,
                     uint32_t *maximum);
};

/* Messages and errors. */
extern void nbdkit_error (const char *fmt, ...) NBDKIT_PRINTF (1, 2);
extern void nbdkit_verror (const char *fmt, va_list args) NBDKIT_PRINTF (1, 0);
extern void nbdkit_debug (const char *fmt, ...) NBDKIT_PRINTF (1, 2);
extern void nbdkit_vdebug (const char *fmt, va_list args) NBDKIT_PRINTF (1, 0);
extern void nbdkit_set_error (int err);

/* Parsing parameters. */
extern char *nbdkit_absolute_path (const char *path);
extern char *nbdkit_realpath (const char *path);
extern int64_t nbdkit_parse_size (const char *str);
extern int nbdkit_parse_bool (const char *str);
extern int nbdkit_parse_int (const char *what, const char *str, int *r);
extern int nbdkit_parse_unsigned (const char *what, const char *str, unsigned *r);
extern int nbdkit_parse_int8_t (const char *what, const char *str, int8_t *r);
extern int nbdkit_parse_uint8_t (const char *what, const char *str, uint8_t *r);
extern int nbdkit_parse_int16_t (const char *what, const char *str, int16_t *r);
extern int nbdkit_parse_uint16_t (const char *what, const char *str, uint16_t *r);
extern int nbdkit_parse_int32_t (const char *what, const char *str, int32_t *r);
extern int nbdkit_parse_uint32_t (const char *what, const char *str, uint32_t *r);
extern int nbdkit_parse_int64_t (const char *what, const char *str, int64_t *r);
extern int nbdkit_parse_uint64_t (const char *what, const char *str, uint64_t *r);
extern int nbdkit_read_password (const char *value, char **password);
extern int nbdkit_stdio_safe (void);

/* Strings that live until the end of the connection (or of the server). */
extern const char *nbdkit_strdup_intern (const char *str);
extern const char *nbdkit_strndup_intern (const char *str, size_t n);
extern const char *nbdkit_printf_intern (const char *fmt, ...) NBDKIT_PRINTF (1, 2);
extern const char *nbdkit_vprintf_intern (const char *fmt, va_list args) NBDKIT_PRINTF (1, 0);

/* Replies. */
extern int nbdkit_add_extent (struct nbdkit_extents *extents, uint64_t offset,
                              uint64_t length, uint32_t type);
extern int nbdkit_add_export (struct nbdkit_exports *exports, const char *name,
                              const char *description);
extern int nbdkit_use_default_export (struct nbdkit_exports *exports);

/* The client and the server. */
extern const char *nbdkit_export_name (void);
extern int nbdkit_is_tls (void);
extern int nbdkit_nanosleep (unsigned sec, unsigned nsec);
extern int nbdkit_peer_name (struct sockaddr *addr, socklen_t *addrlen);
extern int64_t nbdkit_peer_pid (void);
extern int64_t nbdkit_peer_uid (void);
extern int64_t nbdkit_peer_gid (void);
extern void nbdkit_shutdown (void);
extern void nbdkit_disconnect (int force);

#ifdef __cplusplus
#define NBDKIT_CXX_LANG_C extern "C"
#else
#define NBDKIT_CXX_LANG_C
#endif

#define NBDKIT_REGISTER_PLUGIN(plugin)                  \
  NBDKIT_CXX_LANG_C NBDKIT_DLL_PUBLIC                   \
  struct nbdkit_plugin *                                \
  plugin_init (void)                                    \
  {                                                     \
    (plugin)._struct_size = sizeof (plugin);            \
    (plugin)._api_version = NBDKIT_API_VERSION;         \
    (plugin)._thread_model = THREAD_MODEL;              \
    return &(plugin);                                   \
  }

#ifdef __cplusplus
}
#endif

#endif /* NBDKIT_PLUGIN_H */
