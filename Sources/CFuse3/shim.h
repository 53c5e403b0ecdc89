/* libfuse3 for Swift: the API version must be set before the headers. */
#ifndef CFUSE3_SHIM_H
#define CFUSE3_SHIM_H
#define FUSE_USE_VERSION 35
#include <fuse3/fuse_lowlevel.h>
#include <fuse3/cuse_lowlevel.h>
#endif
