/* Helpers shared by the spool and sink unit tests: temporary folders,
 * completion counting and blocking appends. Each test program includes
 * it once, and the functions are static inline so that a program may
 * leave some unused.
 */
#ifndef INGESTD_TESTS_TEST_SPOOL_UTIL_H
#define INGESTD_TESTS_TEST_SPOOL_UTIL_H

#include <dirent.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include "spool/spool.h"

/* Counts completions of appends and remembers the last status. */
typedef struct waiter {
    pthread_mutex_t lock;
    pthread_cond_t cv;
    int calls;
    int failures;
    int last_status;
} waiter_t;

static inline void waiter_init(waiter_t *w)
{
    pthread_mutex_init(&w->lock, NULL);
    pthread_cond_init(&w->cv, NULL);
    w->calls = 0;
    w->failures = 0;
    w->last_status = 0;
}

static inline void on_waiter_done(void *arg, int status)
{
    waiter_t *w = arg;

    pthread_mutex_lock(&w->lock);
    w->calls++;
    if (status != 0)
        w->failures++;
    w->last_status = status;
    pthread_cond_broadcast(&w->cv);
    pthread_mutex_unlock(&w->lock);
}

/* Blocks until `calls` completions ran. No deadline: a lost completion
 * shows as a test that hangs until ctest's timeout. */
static inline void waiter_wait(waiter_t *w, int calls)
{
    pthread_mutex_lock(&w->lock);
    while (w->calls < calls)
        pthread_cond_wait(&w->cv, &w->lock);
    pthread_mutex_unlock(&w->lock);
}

/* Appends one string record and waits for its completion. Returns the
 * append's return code or the completion status. */
static inline int append_sync(spool_t *s, const char *text)
{
    waiter_t w;
    struct iovec iov = {.iov_base = (void *)text, .iov_len = strlen(text)};
    int rc;

    waiter_init(&w);
    rc = spool_append(s, &iov, 1, on_waiter_done, &w);
    if (rc != 0)
        return rc;
    waiter_wait(&w, 1);
    return w.last_status;
}

/* Creates a new empty folder under /tmp and returns its path (static). */
static inline const char *make_temp_dir(void)
{
    static char path[64];

    snprintf(path, sizeof(path), "/tmp/ingestd-test-XXXXXX");
    if (mkdtemp(path) == NULL)
        abort();
    return path;
}

/* Removes `path` and everything below it. */
static inline void remove_tree(const char *path)
{
    DIR *d = opendir(path);
    struct dirent *de;
    char child[1024];

    if (d == NULL) {
        unlink(path);
        return;
    }
    while ((de = readdir(d)) != NULL) {
        if (strcmp(de->d_name, ".") == 0 || strcmp(de->d_name, "..") == 0)
            continue;
        if (snprintf(child, sizeof(child), "%s/%s", path, de->d_name) >=
            (int)sizeof(child))
            continue;
        struct stat st;
        if (lstat(child, &st) == 0 && S_ISDIR(st.st_mode))
            remove_tree(child);
        else
            unlink(child);
    }
    closedir(d);
    rmdir(path);
}

/* Counts the files in `dir` whose name ends with `suffix`. */
static inline int count_files(const char *dir, const char *suffix)
{
    DIR *d = opendir(dir);
    struct dirent *de;
    size_t slen = strlen(suffix);
    int n = 0;

    if (d == NULL)
        return -1;
    while ((de = readdir(d)) != NULL) {
        size_t len = strlen(de->d_name);
        if (len >= slen && strcmp(de->d_name + len - slen, suffix) == 0)
            n++;
    }
    closedir(d);
    return n;
}

#endif
