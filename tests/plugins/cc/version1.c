/* An API version 1 plugin (the default without NBDKIT_API_VERSION): a 64 KiB
 * RAM disk whose zero records may_trim at offset 0. */
#include <stdint.h>
#include <string.h>

#include <nbdkit-plugin.h>

#define THREAD_MODEL NBDKIT_THREAD_MODEL_SERIALIZE_ALL_REQUESTS

static char disk[65536];

static void *v1_open (int readonly) { return NBDKIT_HANDLE_NOT_NEEDED; }
static int64_t v1_get_size (void *h) { return sizeof disk; }

static int
v1_pread (void *h, void *buf, uint32_t count, uint64_t offset)
{
  memcpy (buf, disk + offset, count);
  return 0;
}

static int
v1_pwrite (void *h, const void *buf, uint32_t count, uint64_t offset)
{
  memcpy (disk + offset, buf, count);
  return 0;
}

static int
v1_zero (void *h, uint32_t count, uint64_t offset, int may_trim)
{
  memset (disk + offset, 0, count);
  disk[0] = may_trim ? 'T' : 'Z';
  return 0;
}

static int v1_flush (void *h) { return 0; }

static struct nbdkit_plugin plugin = {
  .name = "version1",
  .open = v1_open,
  .get_size = v1_get_size,
  .pread = v1_pread,
  .pwrite = v1_pwrite,
  .zero = v1_zero,
  .flush = v1_flush,
};

NBDKIT_REGISTER_PLUGIN (plugin)
