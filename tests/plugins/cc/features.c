/* A 1 MiB disk of bytes (offset & 0xff) exercising pynbd's cc plugin:
 *   barrier=N        each pread waits until N preads run at once (PARALLEL proof)
 *   password=VALUE   nbdkit_read_password; the disk's first bytes are the password
 *   number=INT       nbdkit_parse_int32_t; get_size adds it
 *   path=PATH        nbdkit_realpath and nbdkit_absolute_path, logged with nbdkit_debug
 *   fail=BOOL        nbdkit_parse_bool; cache then fails without nbdkit_error
 * list_exports offers "a", "b" and the default export (default_export: "dflt");
 * the export name is written at offset 4096, the peer's address family
 * (nbdkit_peer_name) at 8192; block_size is (512, 4096, 1M). Export "bye":
 * a read disconnects the client (nbdkit_disconnect); export "shutdown": a
 * read shuts the server down (nbdkit_shutdown). */
#include <pthread.h>
#include <sys/socket.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define NBDKIT_API_VERSION 2
#include <nbdkit-plugin.h>

#define THREAD_MODEL NBDKIT_THREAD_MODEL_PARALLEL

static int barrier, fail;
static int32_t number;
static char *password;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cond = PTHREAD_COND_INITIALIZER;
static int waiting;

static int
f_config (const char *key, const char *value)
{
  if (strcmp (key, "barrier") == 0)
    return nbdkit_parse_int ("barrier", value, &barrier);
  if (strcmp (key, "number") == 0)
    return nbdkit_parse_int32_t ("number", value, &number);
  if (strcmp (key, "password") == 0)
    return nbdkit_read_password (value, &password);
  if (strcmp (key, "path") == 0) {
    char *real = nbdkit_realpath (value), *absolute = nbdkit_absolute_path (value);
    if (real == NULL || absolute == NULL)
      return -1;
    nbdkit_debug ("realpath=%s absolute=%s", real, absolute);
    free (real);
    free (absolute);
    return nbdkit_nanosleep (0, 1000);
  }
  if (strcmp (key, "fail") == 0) {
    fail = nbdkit_parse_bool (value);
    return fail == -1 ? -1 : 0;
  }
  nbdkit_error ("unknown parameter '%s'", key);
  return -1;
}

struct handle { char name[64]; int family; };

static void *
f_open (int readonly)
{
  struct handle *h = calloc (1, sizeof *h);
  struct sockaddr_storage peer;
  socklen_t len = sizeof peer;
  strncpy (h->name, nbdkit_export_name (), sizeof h->name - 1);
  h->family = nbdkit_peer_name ((struct sockaddr *) &peer, &len) == 0 ? peer.ss_family : 255;
  return h;
}

static void
f_close (void *h)
{
  free (h);
}

static int64_t
f_get_size (void *h)
{
  return 1024 * 1024 + number;
}

static int
f_block_size (void *h, uint32_t *minimum, uint32_t *preferred, uint32_t *maximum)
{
  *minimum = 512;
  *preferred = 4096;
  *maximum = 1024 * 1024;
  return 0;
}

static int
f_list_exports (int readonly, int is_tls, struct nbdkit_exports *exports)
{
  if (nbdkit_add_export (exports, "a", "the first") == -1 ||
      nbdkit_add_export (exports, "b", NULL) == -1)
    return -1;
  return nbdkit_use_default_export (exports);
}

static const char *
f_default_export (int readonly, int is_tls)
{
  return nbdkit_strdup_intern ("dflt");
}

static int
f_pread (void *handle, void *buf, uint32_t count, uint64_t offset, uint32_t flags)
{
  struct handle *h = handle;
  unsigned char *p = buf;
  if (strcmp (h->name, "bye") == 0)
    nbdkit_disconnect (1);
  if (strcmp (h->name, "shutdown") == 0)
    nbdkit_shutdown ();
  if (barrier > 0) {
    struct timespec deadline;
    clock_gettime (CLOCK_REALTIME, &deadline);
    deadline.tv_sec += 20;
    pthread_mutex_lock (&lock);
    waiting++;
    pthread_cond_broadcast (&cond);
    while (waiting < barrier)
      if (pthread_cond_timedwait (&cond, &lock, &deadline) != 0) {
        pthread_mutex_unlock (&lock);
        nbdkit_error ("only %d preads at once", waiting);
        return -1;
      }
    pthread_mutex_unlock (&lock);
  }
  for (uint32_t i = 0; i < count; i++) {
    uint64_t o = offset + i;
    if (password && o < strlen (password))
      p[i] = password[o];
    else if (o >= 4096 && o < 4096 + sizeof h->name)
      p[i] = h->name[o - 4096];
    else if (o == 8192)
      p[i] = h->family;
    else
      p[i] = o & 0xff;
  }
  return 0;
}

static int
f_cache (void *h, uint32_t count, uint64_t offset, uint32_t flags)
{
  return fail ? -1 : 0;
}

static struct nbdkit_plugin plugin = {
  .name = "features",
  .config = f_config,
  .open = f_open,
  .close = f_close,
  .get_size = f_get_size,
  .block_size = f_block_size,
  .list_exports = f_list_exports,
  .default_export = f_default_export,
  .pread = f_pread,
  .cache = f_cache,
};

NBDKIT_REGISTER_PLUGIN (plugin)
