# storyboard_worker: PGXS build
MODULE_big = storyboard_worker
OBJS = \
	src/storyboard_worker.o \
	src/guc.o \
	src/launcher.o \
	src/consumer.o \
	src/acks.o \
	src/amqp_link.o \
	src/amqp_tls.o \
	src/broker.o \
	src/event_decode.o \
	src/dispatch.o \
	src/plugins.o \
	src/extension.o \
	src/stats.o \
	src/queue_depth.o \
	src/ledger.o \
	src/namecache.o \
	src/scope.o \
	src/util.o \
	src/subscription.o \
	src/render.o \
	src/email.o \
	src/smtp.o \
	src/mailer.o

EXTENSION = storyboard_worker
# storyboard_worker--1.0.sql + the upgrade scripts: CREATE EXTENSION of the
# default version runs 1.0 and then each update, so the two paths cannot differ.
DATA = $(wildcard sql/storyboard_worker--*.sql)
PGFILEDESC = "storyboard_worker - StoryBoard's event worker inside PostgreSQL"

# pg_regress suites: every sql/*.sql that is not an install/upgrade script,
# alphabetically; each one creates what it needs and drops it at the end.
REGRESS = $(sort $(filter-out storyboard_worker--%,$(basename $(notdir $(wildcard sql/*.sql)))))
REGRESS_OPTS = --inputdir=. --load-extension=plpgsql --encoding=UTF8

PKG_CONFIG ?= pkg-config
PG_CPPFLAGS = -Isrc $(shell $(PKG_CONFIG) --cflags librabbitmq json-c openssl libcurl) -Wall -Wextra -Werror \
	-Wno-unused-parameter -Wno-missing-field-initializers -Wno-sign-compare
SHLIB_LINK = $(shell $(PKG_CONFIG) --libs librabbitmq json-c openssl libcurl)

# No JIT bitcode: nothing here is worth inlining into queries.
override with_llvm = no

PG_CONFIG ?= /usr/lib/postgresql/15/bin/pg_config
PGXS := $(shell $(PG_CONFIG) --pgxs)
include $(PGXS)

.PHONY: test demo bench fuzz
test:
	bash test/run_tests.sh
demo:
	bash tools/demo.sh
bench:
	bash bench/run.sh
fuzz:
	$(MAKE) -C fuzz run

# Rebuild every object when a header changes (PGXS tracks no dependencies).
$(OBJS): $(wildcard src/*.h)
