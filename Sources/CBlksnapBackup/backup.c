#define _GNU_SOURCE
#include "CBlksnapBackup.h"
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>
#include <sys/sysmacros.h>
#include <linux/fs.h>
#include <linux/fiemap.h>

const uint32_t bkp_fiemap_extent_last = FIEMAP_EXTENT_LAST;
const uint32_t bkp_fiemap_extent_unknown = FIEMAP_EXTENT_UNKNOWN;
const uint32_t bkp_fiemap_extent_encoded = FIEMAP_EXTENT_ENCODED;
const uint32_t bkp_fiemap_extent_delalloc = FIEMAP_EXTENT_DELALLOC;
const uint32_t bkp_fiemap_extent_not_aligned = FIEMAP_EXTENT_NOT_ALIGNED;
const int bkp_o_direct = O_DIRECT;

int bkp_fiemap(int fd, uint64_t start, struct bkp_extent *out, uint32_t max, uint32_t *mapped)
{
	struct fiemap *map = calloc(1, sizeof(*map) + (size_t)max * sizeof(struct fiemap_extent));
	if (!map) {
		errno = ENOMEM;
		return -1;
	}
	map->fm_start = start;
	map->fm_length = ~0ULL - start;
	map->fm_flags = FIEMAP_FLAG_SYNC;
	map->fm_extent_count = max;
	if (ioctl(fd, FS_IOC_FIEMAP, map) < 0) {
		int e = errno;
		free(map);
		errno = e;
		return -1;
	}
	for (uint32_t i = 0; i < map->fm_mapped_extents && i < max; i++) {
		out[i].logical = map->fm_extents[i].fe_logical;
		out[i].physical = map->fm_extents[i].fe_physical;
		out[i].length = map->fm_extents[i].fe_length;
		out[i].flags = map->fm_extents[i].fe_flags;
	}
	*mapped = map->fm_mapped_extents < max ? map->fm_mapped_extents : max;
	free(map);
	return 0;
}

int bkp_fallocate(int fd, off_t length)
{
	return fallocate(fd, 0, 0, length);
}

static volatile sig_atomic_t caught;

static void on_signal(int sig)
{
	caught = sig;
}

void bkp_catch_interrupts(void)
{
	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_signal;
	sigemptyset(&sa.sa_mask);
	sigaction(SIGINT, &sa, NULL);
	sigaction(SIGTERM, &sa, NULL);
}

int bkp_interrupted(void)
{
	return caught;
}

unsigned int bkp_major(dev_t dev) { return major(dev); }
unsigned int bkp_minor(dev_t dev) { return minor(dev); }

int bkp_pipe_cloexec(int fds[2]) { return pipe2(fds, O_CLOEXEC); }
