/*-------------------------------------------------------------------------
 *
 * consumer.h
 *		One consumer background worker (consumer.c), started by the launcher.
 *
 *-------------------------------------------------------------------------
 */
#ifndef SBW_CONSUMER_H
#define SBW_CONSUMER_H

#include "fmgr.h"

PGDLLEXPORT void sbw_consumer_main(Datum main_arg);

#endif							/* SBW_CONSUMER_H */
