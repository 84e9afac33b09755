#ifndef ARMORY_CSYSTEMD_SHIM_H
#define ARMORY_CSYSTEMD_SHIM_H
// Plain declarations of sd_journal_send*, without the macros that add the C caller's location.
#define SD_JOURNAL_SUPPRESS_LOCATION 1
#include <systemd/sd-daemon.h>
#include <systemd/sd-journal.h>
#include <sys/uio.h>
#endif
