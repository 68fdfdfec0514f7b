/*-------------------------------------------------------------------------
 *
 * storyboard_worker.c
 *		Module entry point: settings, shared memory, the launcher.
 *
 * Nothing here does I/O.  When preloaded, _PG_init asks for the shared
 * state the workers report into and registers the launcher, which starts
 * and supervises the consumers (launcher.c).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "miscadmin.h"
#include "storage/ipc.h"
#include "storage/shmem.h"

#include "scope.h"
#include "storyboard_worker.h"
#include "guc.h"
#include "stats.h"
#include "launcher.h"

PG_MODULE_MAGIC;

void		_PG_init(void);

static shmem_request_hook_type prev_shmem_request_hook = NULL;
static shmem_startup_hook_type prev_shmem_startup_hook = NULL;

/*
 * Ask for our shared memory.  PG15 wants this in shmem_request_hook rather
 * than directly in _PG_init.
 */
static void
sbw_shmem_request(void)
{
	if (prev_shmem_request_hook)
		prev_shmem_request_hook();
	RequestAddinShmemSpace(sbw_shmem_size());
}

/* Create or attach to the shared state once shared memory exists. */
static void
sbw_shmem_startup(void)
{
	if (prev_shmem_startup_hook)
		prev_shmem_startup_hook();
	sbw_shmem_init();
}

/*
 * Module load.  Settings are defined in every process that loads us, so
 * SHOW and ALTER SYSTEM know them; the shared memory and the launcher only
 * exist when we are in shared_preload_libraries.
 */
void
_PG_init(void)
{
	if (IsBinaryUpgrade)
		return;

	sbw_define_gucs();
	sbw_install_log_redaction();
	sbw_scope_init();

	if (!process_shared_preload_libraries_in_progress)
		return;

	prev_shmem_request_hook = shmem_request_hook;
	shmem_request_hook = sbw_shmem_request;
	prev_shmem_startup_hook = shmem_startup_hook;
	shmem_startup_hook = sbw_shmem_startup;

	sbw_register_launcher();
}
