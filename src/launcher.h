/*-------------------------------------------------------------------------
 *
 * launcher.h
 *		The launcher background worker (launcher.c).
 *
 *-------------------------------------------------------------------------
 */
#ifndef SBW_LAUNCHER_H
#define SBW_LAUNCHER_H

#include "fmgr.h"

/* Register the launcher (from _PG_init, under shared_preload_libraries). */
extern void sbw_register_launcher(void);

PGDLLEXPORT void sbw_launcher_main(Datum main_arg);

#endif							/* SBW_LAUNCHER_H */
