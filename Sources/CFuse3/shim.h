/* libfuse3 for Swift: the API version must be set before the headers. */
#ifndef CFUSE3_SHIM_H
#define CFUSE3_SHIM_H
#define FUSE_USE_VERSION 35
#include <fuse3/fuse_lowlevel.h>
#include <fuse3/cuse_lowlevel.h>

/* Hands a session one request made in memory, as if read from its device:
 * the INIT a session on a taken-over connection needs (the kernel sends it
 * only once per connection). */
static inline void cfuse3_process_request(struct fuse_session *se, void *request, size_t size) {
    struct fuse_buf buf = { .size = size, .flags = 0, .mem = request, .fd = -1, .pos = 0 };
    fuse_session_process_buf(se, &buf);
}
#endif
