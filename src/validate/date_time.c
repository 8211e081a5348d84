/* The "date-time" format of RFC 3339, section 5.6, as JSON Schema uses it:
 * full-date "T" full-time, where full-time needs a seconds field and a
 * "Z" or numeric offset. "T" and "Z" may be lower case (RFC 3339, section
 * 5.6, note). A second of 60 is a leap second, valid only at 23:59 UTC.
 */
#include <string.h>

#include "validate/validate_internal.h"

/* Reads `count` decimal digits at s[*pos] into *out. */
static bool read_digits(const char *s, size_t len, size_t *pos, int count,
                        int *out)
{
    int value = 0;

    if (*pos + (size_t)count > len)
        return false;
    for (int i = 0; i < count; i++) {
        char c = s[*pos + (size_t)i];
        if (c < '0' || c > '9')
            return false;
        value = value * 10 + (c - '0');
    }
    *pos += (size_t)count;
    *out = value;
    return true;
}

static bool expect_char(const char *s, size_t len, size_t *pos, char c)
{
    if (*pos >= len || s[*pos] != c)
        return false;
    (*pos)++;
    return true;
}

static int days_in_month(int year, int month)
{
    static const int days[] = {31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
    bool leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;

    return month == 2 && leap ? 29 : days[month - 1];
}

static bool parse_date(const char *s, size_t len, size_t *pos)
{
    int year, month, day;

    if (!read_digits(s, len, pos, 4, &year) || !expect_char(s, len, pos, '-') ||
        !read_digits(s, len, pos, 2, &month) ||
        !expect_char(s, len, pos, '-') || !read_digits(s, len, pos, 2, &day))
        return false;
    if (month < 1 || month > 12)
        return false;
    return day >= 1 && day <= days_in_month(year, month);
}

/* Parses "+HH:MM", "-HH:MM", "Z" or "z" and stores the offset east of UTC
 * in minutes. */
static bool parse_offset(const char *s, size_t len, size_t *pos, int *minutes)
{
    int sign, hour, minute;

    if (*pos < len && (s[*pos] == 'Z' || s[*pos] == 'z')) {
        (*pos)++;
        *minutes = 0;
        return true;
    }
    if (*pos >= len || (s[*pos] != '+' && s[*pos] != '-'))
        return false;
    sign = s[*pos] == '-' ? -1 : 1;
    (*pos)++;
    if (!read_digits(s, len, pos, 2, &hour) || !expect_char(s, len, pos, ':') ||
        !read_digits(s, len, pos, 2, &minute))
        return false;
    if (hour > 23 || minute > 59)
        return false;
    *minutes = sign * (hour * 60 + minute);
    return true;
}

bool validate_date_time_n(const char *s, size_t len)
{
    size_t pos = 0;
    int hour, minute, second, offset, utc_minute;

    if (!parse_date(s, len, &pos))
        return false;
    if (pos >= len || (s[pos] != 'T' && s[pos] != 't'))
        return false;
    pos++;
    if (!read_digits(s, len, &pos, 2, &hour) ||
        !expect_char(s, len, &pos, ':') ||
        !read_digits(s, len, &pos, 2, &minute) ||
        !expect_char(s, len, &pos, ':') ||
        !read_digits(s, len, &pos, 2, &second))
        return false;
    if (hour > 23 || minute > 59 || second > 60)
        return false;
    if (pos < len && s[pos] == '.') {
        size_t start = ++pos;
        while (pos < len && s[pos] >= '0' && s[pos] <= '9')
            pos++;
        if (pos == start)
            return false;
    }
    if (!parse_offset(s, len, &pos, &offset) || pos != len)
        return false;
    if (second == 60) {
        utc_minute = ((hour * 60 + minute - offset) % 1440 + 1440) % 1440;
        return utc_minute == 23 * 60 + 59;
    }
    return true;
}

int validate_is_date_time(const char *s)
{
    return s != NULL && validate_date_time_n(s, strlen(s));
}
