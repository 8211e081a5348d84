#include "core/errors.h"

const char *ing_strerror(int code)
{
    switch (code) {
    case ING_OK:
        return "success";
    case ING_ENOMEM:
        return "out of memory";
    case ING_EINVAL:
        return "invalid argument";
    case ING_EIO:
        return "input/output error";
    case ING_EFULL:
        return "spool is full";
    case ING_ENOTFOUND:
        return "not found";
    case ING_ESHUTDOWN:
        return "service is shutting down";
    case ING_ECORRUPT:
        return "data failed its checksum";
    case ING_EEXIST:
        return "already exists";
    case ING_EDB:
        return "registry database error";
    case ING_ECONFIG:
        return "invalid configuration";
    case ING_ETOOBIG:
        return "value over its limit";
    case ING_ERATE:
        return "rate limit exceeded";
    case ING_EQUOTA:
        return "quota exceeded";
    case ING_EBUSY:
        return "in progress; retry later";
    }
    return "unknown error";
}
