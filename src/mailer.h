/*-------------------------------------------------------------------------
 *
 * mailer.h
 *		The mailer background worker (mailer.c).
 *
 *-------------------------------------------------------------------------
 */
#ifndef SBW_MAILER_H
#define SBW_MAILER_H

#include "fmgr.h"

/* Entry point of the mailer, started by the launcher. */
extern PGDLLEXPORT void sbw_mailer_main(Datum main_arg);

#endif							/* SBW_MAILER_H */
