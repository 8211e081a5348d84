/* Small file system helpers shared by the modules. */
#ifndef INGESTD_CORE_FSUTIL_H
#define INGESTD_CORE_FSUTIL_H

/* Creates `path` and its missing parents with mode 0750. Returns 0, or -1
 * with errno set. An existing folder is not an error. */
int fs_mkdir_p(const char *path);

#endif
