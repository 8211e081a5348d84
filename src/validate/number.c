/* JSON numbers for validation: exact comparison of integers with doubles,
 * multipleOf on decimal values, formatting for error messages, and JSON
 * equality where 1 and 1.0 are the same value.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "validate/validate_internal.h"

__extension__ typedef unsigned __int128 uint128_t;

void validate_num_from_json(const json_t *value, num_t *out)
{
    if (json_is_integer(value)) {
        out->is_int = true;
        out->i = json_integer_value(value);
        out->d = (double)out->i;
    } else {
        out->is_int = false;
        out->i = 0;
        out->d = json_real_value(value);
    }
}

/* Compares an integer with a double without rounding the integer, which a
 * plain conversion to double would do above 2^53. */
static int compare_int_double(json_int_t i, double d)
{
    long long t;
    double frac;

    if (d >= 9223372036854775808.0)
        return -1;
    if (d < -9223372036854775808.0)
        return 1;
    t = (long long)d;
    if (i < t)
        return -1;
    if (i > t)
        return 1;
    /* Both conversions are exact here because d is within the range of a
     * long long, so the fractional part decides. */
    frac = d - (double)t;
    if (frac > 0)
        return -1;
    if (frac < 0)
        return 1;
    return 0;
}

/* Returns -1, 0 or 1 as a is less than, equal to or greater than b. */
int validate_num_compare(const num_t *a, const num_t *b)
{
    if (a->is_int && b->is_int)
        return (a->i > b->i) - (a->i < b->i);
    if (a->is_int)
        return compare_int_double(a->i, b->d);
    if (b->is_int)
        return -compare_int_double(b->i, a->d);
    return (a->d > b->d) - (a->d < b->d);
}

bool validate_num_is_integral(const num_t *n)
{
    return n->is_int || (isfinite(n->d) && floor(n->d) == n->d);
}

static void strip_trailing_zeros(decimal_t *dec)
{
    if (dec->mantissa == 0) {
        dec->exponent = 0;
        return;
    }
    while (dec->mantissa % 10 == 0) {
        dec->mantissa /= 10;
        dec->exponent++;
    }
}

/* Finds the shortest decimal of at most 17 digits that reads back as `d`,
 * which is the text the sender most likely wrote. A double that round-trips
 * with 15 digits prints those digits padded with zeros at precision 15, so
 * three attempts are enough. */
static void shortest_decimal_text(double d, char *buf, size_t size,
                                  int *precision)
{
    for (int p = 14; p <= 16; p++) {
        snprintf(buf, size, "%.*e", p, d);
        *precision = p;
        if (strtod(buf, NULL) == d)
            return;
    }
}

/* Stores |n| as mantissa * 10^exponent. Returns false for a non-finite
 * double, which JSON cannot carry but a caller-built json_t might. */
bool validate_num_to_decimal(const num_t *n, decimal_t *out)
{
    char buf[40];
    const char *p;
    int precision;
    uint64_t mantissa = 0;

    if (n->is_int) {
        out->mantissa = n->i < 0 ? -(uint64_t)n->i : (uint64_t)n->i;
        out->exponent = 0;
        strip_trailing_zeros(out);
        return true;
    }
    if (!isfinite(n->d))
        return false;
    if (n->d == 0) {
        out->mantissa = 0;
        out->exponent = 0;
        return true;
    }
    shortest_decimal_text(fabs(n->d), buf, sizeof(buf), &precision);
    /* The text reads "d.ddde+XX": the digits form the mantissa, and the
     * exponent shifts by the number of digits after the point. */
    for (p = buf; *p != '\0' && *p != 'e'; p++) {
        if (*p >= '0' && *p <= '9')
            mantissa = mantissa * 10 + (uint64_t)(*p - '0');
    }
    if (*p != 'e')
        return false;
    out->mantissa = mantissa;
    out->exponent = atoi(p + 1) - precision;
    strip_trailing_zeros(out);
    return true;
}

/* Returns 10^exponent mod m, by squaring. */
static uint64_t pow10_mod(int exponent, uint64_t m)
{
    uint64_t result = 1 % m;
    uint64_t base = 10 % m;

    while (exponent > 0) {
        if (exponent & 1)
            result = (uint64_t)((uint128_t)result * base % m);
        base = (uint64_t)((uint128_t)base * base % m);
        exponent >>= 1;
    }
    return result;
}

/* Returns true if n / divisor is an integer, where divisor > 0. Integers use
 * the remainder. Anything else is compared as exact decimals, so binary
 * rounding (19.99 / 0.01 = 1998.9999999999998 in doubles) cannot reject a
 * true multiple, and a quotient too large for a double (1e308 / 0.123456789)
 * does not overflow. */
bool validate_num_is_multiple(const num_t *n, const num_t *divisor,
                              const decimal_t *divisor_decimal)
{
    decimal_t value;
    uint64_t m = divisor_decimal->mantissa;
    int shift;

    if (n->is_int && divisor->is_int)
        return n->i % divisor->i == 0;
    if (!validate_num_to_decimal(n, &value))
        return false;
    if (value.mantissa == 0)
        return true;
    shift = value.exponent - divisor_decimal->exponent;
    if (shift >= 0) {
        /* The value is mantissa * 10^shift in units of the divisor's last
         * digit, so it must be divisible by the divisor's mantissa. */
        uint128_t product =
            (uint128_t)(value.mantissa % m) * pow10_mod(shift, m);
        return product % m == 0;
    }
    /* The value has digits below the divisor's last digit, so the value's
     * mantissa must be divisible by m * 10^-shift. */
    for (; shift < 0; shift++) {
        if (m > UINT64_MAX / 10)
            return false; /* m * 10 exceeds every possible mantissa */
        m *= 10;
    }
    return value.mantissa % m == 0;
}

/* Writes the shortest text that reads back as `n`, such as "120.5". */
void validate_num_format(const num_t *n, char *buf, size_t size)
{
    if (n->is_int) {
        snprintf(buf, size, "%lld", (long long)n->i);
        return;
    }
    for (int p = 15; p <= 17; p++) {
        snprintf(buf, size, "%.*g", p, n->d);
        if (strtod(buf, NULL) == n->d)
            return;
    }
}

static bool objects_equal(const json_t *a, const json_t *b)
{
    const char *key;
    size_t key_len;
    json_t *value;

    if (json_object_size(a) != json_object_size(b))
        return false;
    /* The jansson iteration macros take a non-const object, but only read
     * it. */
    json_object_keylen_foreach ((json_t *)a, key, key_len, value) {
        const json_t *other = json_object_getn(b, key, key_len);
        if (other == NULL || !validate_json_equal(value, other))
            return false;
    }
    return true;
}

/* Compares two JSON values as JSON Schema does for enum, const and
 * uniqueItems: numbers by value, so 1 equals 1.0, and objects without regard
 * to key order. */
bool validate_json_equal(const json_t *a, const json_t *b)
{
    num_t x, y;

    if (a == b)
        return true;
    if (json_is_number(a) && json_is_number(b)) {
        validate_num_from_json(a, &x);
        validate_num_from_json(b, &y);
        return validate_num_compare(&x, &y) == 0;
    }
    if (json_typeof(a) != json_typeof(b))
        return false;
    switch (json_typeof(a)) {
    case JSON_STRING:
        return json_string_length(a) == json_string_length(b) &&
               memcmp(json_string_value(a), json_string_value(b),
                      json_string_length(a)) == 0;
    case JSON_ARRAY:
        if (json_array_size(a) != json_array_size(b))
            return false;
        for (size_t i = 0; i < json_array_size(a); i++) {
            if (!validate_json_equal(json_array_get(a, i),
                                     json_array_get(b, i)))
                return false;
        }
        return true;
    case JSON_OBJECT:
        return objects_equal(a, b);
    default:
        /* true, false and null have no content beyond their type. */
        return true;
    }
}
