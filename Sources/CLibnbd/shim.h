#ifndef CLIBNBD_SHIM_H
#define CLIBNBD_SHIM_H
#include <libnbd.h>
#endif
