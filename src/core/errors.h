/* Error codes shared by every module.
 *
 * Functions return 0 on success or one of these negative codes. System call
 * failures are converted at the call site, and the errno detail goes into the
 * log line or the caller's error buffer.
 */
#ifndef INGESTD_CORE_ERRORS_H
#define INGESTD_CORE_ERRORS_H

enum ing_error {
    ING_OK = 0,
    ING_ENOMEM = -1,     /* allocation failed */
    ING_EINVAL = -2,     /* invalid argument or input */
    ING_EIO = -3,        /* a read, write or fsync failed */
    ING_EFULL = -4,      /* the spool is at its size limit */
    ING_ENOTFOUND = -5,  /* no such device, file or record */
    ING_ESHUTDOWN = -6,  /* the service is stopping */
    ING_ECORRUPT = -7,   /* on-disk data failed its checksum */
    ING_EEXIST = -8,     /* the object already exists */
    ING_EDB = -9,        /* an SQLite call failed */
    ING_ECONFIG = -10,   /* the configuration is invalid */
    ING_ETOOBIG = -11,   /* a value is over its configured limit */
    ING_EBUSY = -12,     /* the same work is in progress; retry later */
    ING_ERATE = -13,     /* over a rate limit; retry after a delay */
    ING_EQUOTA = -14,    /* over the daily quota or a connection limit */
};

/* Returns a static, human-readable description of an ing_error code. */
const char *ing_strerror(int code);

#endif
