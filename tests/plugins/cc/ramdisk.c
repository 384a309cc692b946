#if 0
exec pynbd serve cc "$0" "$@"
#endif
/* A RAM disk: size=SIZE (default 100M). Extents report never-written
 * 1 MiB chunks as holes; write "fail" at offset 0 to make the next
 * read fail with ENOSPC through nbdkit_set_error. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <errno.h>

#define NBDKIT_API_VERSION 2
#include <nbdkit-plugin.h>

#define THREAD_MODEL NBDKIT_THREAD_MODEL_PARALLEL
#define CHUNK (1024 * 1024)

static int64_t size = 100 * 1024 * 1024;
static char *disk;
static unsigned char *written;

static int
ramdisk_config (const char *key, const char *value)
{
  if (strcmp (key, "size") == 0) {
    size = nbdkit_parse_size (value);
    if (size == -1)
      return -1;
    return 0;
  }
  nbdkit_error ("unknown parameter '%s'", key);
  return -1;
}

static int
ramdisk_get_ready (void)
{
  disk = calloc (1, size);
  written = calloc (1, size / CHUNK + 1);
  if (disk == NULL || written == NULL) {
    nbdkit_error ("calloc: %m");
    return -1;
  }
  return 0;
}

static void *
ramdisk_open (int readonly)
{
  nbdkit_debug ("ramdisk: open export '%s'", nbdkit_export_name ());
  return NBDKIT_HANDLE_NOT_NEEDED;
}

static int64_t
ramdisk_get_size (void *handle)
{
  return size;
}

static int
ramdisk_can_multi_conn (void *handle)
{
  return 1;
}

static int
ramdisk_pread (void *handle, void *buf, uint32_t count, uint64_t offset, uint32_t flags)
{
  if (memcmp (disk, "fail", 4) == 0) {
    nbdkit_error ("the disk says fail");
    nbdkit_set_error (ENOSPC);
    return -1;
  }
  memcpy (buf, disk + offset, count);
  return 0;
}

static void
mark (uint32_t count, uint64_t offset)
{
  for (uint64_t c = offset / CHUNK; c <= (offset + count - 1) / CHUNK; c++)
    written[c] = 1;
}

static int
ramdisk_pwrite (void *handle, const void *buf, uint32_t count, uint64_t offset, uint32_t flags)
{
  memcpy (disk + offset, buf, count);
  mark (count, offset);
  return 0;
}

static int
ramdisk_zero (void *handle, uint32_t count, uint64_t offset, uint32_t flags)
{
  memset (disk + offset, 0, count);
  return 0;
}

static int
ramdisk_trim (void *handle, uint32_t count, uint64_t offset, uint32_t flags)
{
  memset (disk + offset, 0, count);
  return 0;
}

static int
ramdisk_flush (void *handle, uint32_t flags)
{
  return 0;
}

static int
ramdisk_extents (void *handle, uint32_t count, uint64_t offset, uint32_t flags,
                 struct nbdkit_extents *extents)
{
  uint64_t c = offset / CHUNK;
  for (; c * CHUNK < offset + count && c * CHUNK < (uint64_t) size; c++) {
    uint64_t len = CHUNK;
    if (c * CHUNK + len > (uint64_t) size)
      len = size - c * CHUNK;
    if (nbdkit_add_extent (extents, c * CHUNK, len,
                           written[c] ? 0 : NBDKIT_EXTENT_HOLE | NBDKIT_EXTENT_ZERO) == -1)
      return -1;
  }
  return 0;
}

static struct nbdkit_plugin plugin = {
  .name = "ramdisk",
  .version = "1.0",
  .config = ramdisk_config,
  .config_help = "size=SIZE  the size of the disk (default 100M)",
  .magic_config_key = "size",
  .get_ready = ramdisk_get_ready,
  .open = ramdisk_open,
  .get_size = ramdisk_get_size,
  .can_multi_conn = ramdisk_can_multi_conn,
  .pread = ramdisk_pread,
  .pwrite = ramdisk_pwrite,
  .zero = ramdisk_zero,
  .trim = ramdisk_trim,
  .flush = ramdisk_flush,
  .extents = ramdisk_extents,
};

NBDKIT_REGISTER_PLUGIN (plugin)
