/* Regular expressions for "pattern" and "patternProperties", with PCRE2.
 *
 * JSON Schema specifies ECMA-262 regular expressions. PCRE2 with the options
 * below is close to ECMA-262 in Unicode mode: "$" matches only at the end,
 * "\u0041" and "\u{1F600}" are code point escapes, and "\d" and "\w" stay
 * ASCII. PCRE2 10.42 knows only the short names of Unicode general
 * categories, so "\p{Letter}" and "\p{General_Category=Letter}" are
 * rewritten to "\p{L}" before compiling. Lookbehind limits and some escapes
 * still differ.
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "validate/validate_internal.h"

/* Bounds on one match, so that a pattern with catastrophic backtracking
 * fails the check instead of holding a worker. */
#define MATCH_LIMIT 200000
#define MATCH_HEAP_LIMIT_KIB 4096

static pthread_once_t match_data_once = PTHREAD_ONCE_INIT;
static pthread_key_t match_data_key;
static bool match_data_key_ok;

static void free_match_data(void *data)
{
    pcre2_match_data_free(data);
}

static void create_match_data_key(void)
{
    match_data_key_ok =
        pthread_key_create(&match_data_key, free_match_data) == 0;
}

/* Returns this thread's match data, created on its first match, so that
 * matching allocates nothing afterwards. PCRE2 also keeps its backtracking
 * frames in the match data and reuses them. */
static pcre2_match_data *thread_match_data(void)
{
    pcre2_match_data *md;

    pthread_once(&match_data_once, create_match_data_key);
    if (!match_data_key_ok)
        return NULL;
    md = pthread_getspecific(match_data_key);
    if (md != NULL)
        return md;
    /* One pair is enough because only "did it match" matters. */
    md = pcre2_match_data_create(1, NULL);
    if (md != NULL && pthread_setspecific(match_data_key, md) != 0) {
        pcre2_match_data_free(md);
        md = NULL;
    }
    return md;
}

/* The long names of Unicode general categories that ECMA-262 accepts in
 * \p{...} and \P{...}, with the short names PCRE2 accepts. */
static const struct {
    const char *long_name;
    const char *short_name;
} categories[] = {
    {"Cased_Letter", "L&"},
    {"Close_Punctuation", "Pe"},
    {"Connector_Punctuation", "Pc"},
    {"Control", "Cc"},
    {"Currency_Symbol", "Sc"},
    {"Dash_Punctuation", "Pd"},
    {"Decimal_Number", "Nd"},
    {"Enclosing_Mark", "Me"},
    {"Final_Punctuation", "Pf"},
    {"Format", "Cf"},
    {"Initial_Punctuation", "Pi"},
    {"Letter", "L"},
    {"Letter_Number", "Nl"},
    {"Line_Separator", "Zl"},
    {"Lowercase_Letter", "Ll"},
    {"Mark", "M"},
    {"Combining_Mark", "M"},
    {"Math_Symbol", "Sm"},
    {"Modifier_Letter", "Lm"},
    {"Modifier_Symbol", "Sk"},
    {"Nonspacing_Mark", "Mn"},
    {"Number", "N"},
    {"Open_Punctuation", "Ps"},
    {"Other", "C"},
    {"Other_Letter", "Lo"},
    {"Other_Number", "No"},
    {"Other_Punctuation", "Po"},
    {"Other_Symbol", "So"},
    {"Paragraph_Separator", "Zp"},
    {"Private_Use", "Co"},
    {"Punctuation", "P"},
    {"Separator", "Z"},
    {"Space_Separator", "Zs"},
    {"Spacing_Mark", "Mc"},
    {"Surrogate", "Cs"},
    {"Symbol", "S"},
    {"Titlecase_Letter", "Lt"},
    {"Unassigned", "Cn"},
    {"Uppercase_Letter", "Lu"},
    {"cntrl", "Cc"},
    {"digit", "Nd"},
    {"punct", "P"},
};

/* Returns the PCRE2 name for the property name inside \p{...}, or NULL
 * to keep the name as written. */
static const char *pcre2_property_name(const char *name, size_t len)
{
    static const char *prefixes[] = {"General_Category=", "gc="};

    for (size_t i = 0; i < sizeof(prefixes) / sizeof(prefixes[0]); i++) {
        size_t plen = strlen(prefixes[i]);
        if (len > plen && memcmp(name, prefixes[i], plen) == 0) {
            name += plen;
            len -= plen;
            break;
        }
    }
    for (size_t i = 0; i < sizeof(categories) / sizeof(categories[0]); i++) {
        if (strlen(categories[i].long_name) == len &&
            memcmp(categories[i].long_name, name, len) == 0)
            return categories[i].short_name;
    }
    return NULL;
}

/* Copies `source` with each \p{Long_Name} or \P{Long_Name} replaced by the
 * short name. Returns a malloc'd string, or NULL when out of memory. */
static char *rewrite_properties(const char *source, size_t len, size_t *out_len)
{
    /* A short name is never longer than the long name it replaces. */
    char *out = malloc(len + 1);
    size_t o = 0;

    if (out == NULL)
        return NULL;
    for (size_t i = 0; i < len; i++) {
        const char *end, *name;

        if (source[i] != '\\' || i + 1 >= len) {
            out[o++] = source[i];
            continue;
        }
        if ((source[i + 1] != 'p' && source[i + 1] != 'P') || i + 2 >= len ||
            source[i + 2] != '{' ||
            (end = memchr(source + i + 3, '}', len - i - 3)) == NULL ||
            (name = pcre2_property_name(
                 source + i + 3, (size_t)(end - (source + i + 3)))) == NULL) {
            /* Any other escape is copied whole, so that "\\p{...}" stays
             * an escaped backslash followed by text. */
            out[o++] = source[i];
            out[o++] = source[++i];
            continue;
        }
        out[o++] = '\\';
        out[o++] = source[i + 1];
        out[o++] = '{';
        memcpy(out + o, name, strlen(name));
        o += strlen(name);
        out[o++] = '}';
        i = (size_t)(end - source);
    }
    out[o] = '\0';
    *out_len = o;
    return out;
}

int validate_regex_compile(schema_regex_t *re, const char *source, size_t len,
                           char *err, size_t errlen)
{
    pcre2_compile_context *ccontext;
    int code;
    PCRE2_SIZE offset;
    PCRE2_UCHAR message[256];

    char *rewritten;
    size_t rewritten_len;

    re->source = source;
    re->code = NULL;
    ccontext = pcre2_compile_context_create(NULL);
    rewritten = rewrite_properties(source, len, &rewritten_len);
    if (ccontext == NULL || rewritten == NULL) {
        pcre2_compile_context_free(ccontext);
        free(rewritten);
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    pcre2_set_compile_extra_options(ccontext, PCRE2_EXTRA_ALT_BSUX);
    re->code = pcre2_compile((PCRE2_SPTR)rewritten, rewritten_len,
                             PCRE2_UTF | PCRE2_DOLLAR_ENDONLY | PCRE2_ALT_BSUX,
                             &code, &offset, ccontext);
    pcre2_compile_context_free(ccontext);
    free(rewritten);
    if (re->code == NULL) {
        pcre2_get_error_message(code, message, sizeof(message));
        snprintf(err, errlen, "%s at offset %zu", (const char *)message,
                 (size_t)offset);
        return -1;
    }
    /* JIT is only faster, so a platform without it falls back to the
     * interpreter. */
    (void)pcre2_jit_compile(re->code, PCRE2_JIT_COMPLETE);
    return 0;
}

void validate_regex_free(schema_regex_t *re)
{
    pcre2_code_free(re->code);
    re->code = NULL;
}

/* Creates the match context with the backtracking limits. Returns NULL when
 * out of memory. */
pcre2_match_context *validate_regex_match_context(void)
{
    pcre2_match_context *mctx = pcre2_match_context_create(NULL);

    if (mctx == NULL)
        return NULL;
    pcre2_set_match_limit(mctx, MATCH_LIMIT);
    pcre2_set_heap_limit(mctx, MATCH_HEAP_LIMIT_KIB);
    return mctx;
}

/* Returns true if the pattern matches anywhere in s. A match that runs out
 * of memory or over the limits counts as no match, so the value is
 * rejected rather than let through unchecked. */
bool validate_regex_match(const schema_regex_t *re,
                          const pcre2_match_context *mctx, const char *s,
                          size_t len)
{
    pcre2_match_data *md = thread_match_data();
    int rc;

    if (md == NULL)
        return false;
    /* pcre2_match() takes a non-const context but only reads it. */
    rc = pcre2_match(re->code, (PCRE2_SPTR)s, len, 0, 0, md,
                     (pcre2_match_context *)mctx);
    /* Zero means a match whose groups did not fit in the one pair. */
    return rc >= 0;
}
