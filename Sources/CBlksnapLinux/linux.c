#define _GNU_SOURCE
#include "CBlksnapLinux.h"

#include <fcntl.h>
#include <linux/falloc.h>

const int blksnap_o_direct = O_DIRECT;

int blksnap_punch_hole(int fd, off_t offset, off_t length)
{
	return fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length);
}
