/* Runs the JSON-Schema-Test-Suite files (draft 2020-12) against the
 * validator.
 *
 * Every test group whose schema compiles must give the expected verdict for
 * each of its cases. A group whose schema is rejected as unsupported is
 * skipped, and one line names it with the keyword. The folder comes from
 * $INGESTD_SOURCE_DIR/../shared/json-schema-test-suite, which ctest sets,
 * or ../shared/json-schema-test-suite from the current directory.
 */
#include <dirent.h>
#include <limits.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "validate/validate.h"

#define SUITE_SUBDIR "shared/json-schema-test-suite"

typedef struct totals {
    int passed;
    int failed;
    int skipped;
} totals_t;

static int compare_names(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* Lists the *.json files of `dir` in name order. Returns the count, or -1
 * when the folder cannot be opened. */
static int list_suite_files(const char *dir, char ***out)
{
    DIR *d = opendir(dir);
    struct dirent *entry;
    char **names = NULL;
    int count = 0;

    if (d == NULL)
        return -1;
    while ((entry = readdir(d)) != NULL) {
        size_t len = strlen(entry->d_name);
        if (len < 6 || strcmp(entry->d_name + len - 5, ".json") != 0)
            continue;
        names = realloc(names, (size_t)(count + 1) * sizeof(*names));
        assert_non_null(names);
        names[count] = strdup(entry->d_name);
        assert_non_null(names[count]);
        count++;
    }
    closedir(d);
    qsort(names, (size_t)count, sizeof(*names), compare_names);
    *out = names;
    return count;
}

/* Copies the keyword from a message such as `#/x: unsupported keyword
 * "format" value "email"` into `out`. Returns 0 when the message is not
 * about an unsupported keyword. */
static int unsupported_keyword(const char *message, char *out, size_t size)
{
    static const char marker[] = "unsupported keyword \"";
    const char *start = strstr(message, marker);
    const char *end;

    if (start == NULL)
        return 0;
    start += sizeof(marker) - 1;
    end = strchr(start, '"');
    if (end == NULL || (size_t)(end - start) >= size)
        return 0;
    memcpy(out, start, (size_t)(end - start));
    out[end - start] = '\0';
    return 1;
}

/* Runs one case and returns 1 when the verdict is the expected one. The
 * verdict without an error list must agree with the verdict with one, and
 * an invalid instance must come with at least one complete error. */
static int run_case(const schema_t *schema, const json_t *test)
{
    const json_t *data = json_object_get(test, "data");
    int expected_valid = json_is_true(json_object_get(test, "valid"));
    validate_errors_t errs;
    int with_list, without_list, ok;

    validate_errors_init(&errs);
    with_list = schema_validate(schema, data, &errs);
    without_list = schema_validate(schema, data, NULL);
    ok = (with_list == 0) == expected_valid;
    if ((with_list == 0) != (without_list == 0)) {
        printf("    verdict without an error list differs\n");
        ok = 0;
    }
    if (with_list > 0 && (errs.count == 0 || errs.items[0].pointer == NULL ||
                          errs.items[0].reason == NULL)) {
        printf("    invalid, but no error was recorded\n");
        ok = 0;
    }
    if (!ok && errs.count > 0)
        printf("    first error: \"%s\" %s\n", errs.items[0].pointer,
               errs.items[0].reason);
    validate_errors_clear(&errs);
    return ok;
}

static void run_group(const char *file, const json_t *group, totals_t *t)
{
    const char *description =
        json_string_value(json_object_get(group, "description"));
    json_t *tests = json_object_get(group, "tests");
    schema_t *schema = NULL;
    char err[512], keyword[64];
    size_t i;
    json_t *test;

    if (schema_compile(json_object_get(group, "schema"), &schema, err,
                       sizeof(err)) != 0) {
        if (unsupported_keyword(err, keyword, sizeof(keyword))) {
            printf("skipped %s \"%s\": %s (%s)\n", file, description, keyword,
                   err);
            t->skipped += (int)json_array_size(tests);
        } else {
            printf("FAILED %s \"%s\": schema did not compile: %s\n", file,
                   description, err);
            t->failed += (int)json_array_size(tests);
        }
        return;
    }
    json_array_foreach (tests, i, test) {
        if (run_case(schema, test)) {
            t->passed++;
            continue;
        }
        t->failed++;
        printf("FAILED %s \"%s\" / \"%s\": expected %s\n", file, description,
               json_string_value(json_object_get(test, "description")),
               json_is_true(json_object_get(test, "valid")) ? "valid"
                                                            : "invalid");
    }
    schema_free(schema);
}

static void run_file(const char *dir, const char *file, totals_t *t)
{
    char path[PATH_MAX];
    json_error_t jerr;
    json_t *groups, *group;
    size_t i;

    if (snprintf(path, sizeof(path), "%s/%s", dir, file) >= (int)sizeof(path)) {
        printf("FAILED %s: path too long\n", file);
        t->failed++;
        return;
    }
    groups = json_load_file(path, JSON_ALLOW_NUL, &jerr);
    if (groups == NULL) {
        printf("FAILED %s: cannot parse line %d: %s\n", file, jerr.line,
               jerr.text);
        t->failed++;
        return;
    }
    json_array_foreach (groups, i, group) {
        run_group(file, group, t);
    }
    json_decref(groups);
}

static void suite_passes_supported_groups(void **state)
{
    const char *source = getenv("INGESTD_SOURCE_DIR");
    char dir[PATH_MAX];
    char **files = NULL;
    totals_t t = {0};
    int count;

    (void)state;
    if (source != NULL)
        snprintf(dir, sizeof(dir), "%s/../" SUITE_SUBDIR, source);
    else
        snprintf(dir, sizeof(dir), "../" SUITE_SUBDIR);
    count = list_suite_files(dir, &files);
    if (count <= 0)
        fail_msg("no JSON-Schema-Test-Suite files in %s", dir);
    for (int i = 0; i < count; i++) {
        run_file(dir, files[i], &t);
        free(files[i]);
    }
    free(files);
    printf("%d passed, %d failed, %d skipped\n", t.passed, t.failed, t.skipped);
    assert_int_equal(t.failed, 0);
    assert_true(t.passed > 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(suite_passes_supported_groups),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
