/* MQTT topic templates with one {device_id} level, such as
 * "devices/{device_id}/data". config.c has already checked each template:
 * no wildcards, and the placeholder exactly once as a whole level.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bridge/bridge_internal.h"

#define PLACEHOLDER "{device_id}"
#define PLACEHOLDER_LEN (sizeof(PLACEHOLDER) - 1)

char *bridge_topic_expand(const char *template, const char *level)
{
    const char *at = strstr(template, PLACEHOLDER);
    size_t prefix, suffix, level_len = strlen(level);
    char *out;

    if (at == NULL)
        return strdup(template);
    prefix = (size_t)(at - template);
    suffix = strlen(at + PLACEHOLDER_LEN);
    out = malloc(prefix + level_len + suffix + 1);
    if (out == NULL)
        return NULL;
    memcpy(out, template, prefix);
    memcpy(out + prefix, level, level_len);
    memcpy(out + prefix + level_len, at + PLACEHOLDER_LEN, suffix + 1);
    return out;
}

char *bridge_topic_filter(const char *template, const char *group)
{
    char *filter = bridge_topic_expand(template, "+");
    char *shared;
    size_t size;

    if (filter == NULL || group == NULL)
        return filter;
    size = strlen("$share/") + strlen(group) + 1 + strlen(filter) + 1;
    shared = malloc(size);
    if (shared != NULL)
        snprintf(shared, size, "$share/%s/%s", group, filter);
    free(filter);
    return shared;
}

int bridge_topic_match(const char *template, const char *topic, char *id,
                       size_t size)
{
    const char *at = strstr(template, PLACEHOLDER);
    size_t prefix, suffix, topic_len = strlen(topic), id_len;
    const char *id_start;

    if (at == NULL)
        return 0;
    prefix = (size_t)(at - template);
    suffix = strlen(at + PLACEHOLDER_LEN);
    if (topic_len < prefix + suffix + 1)
        return 0;
    if (memcmp(topic, template, prefix) != 0 ||
        memcmp(topic + topic_len - suffix, at + PLACEHOLDER_LEN, suffix) != 0)
        return 0;
    id_start = topic + prefix;
    id_len = topic_len - prefix - suffix;
    /* A '/' inside would mean the topic has more levels than the
     * template, so it matches another filter, not this one. */
    if (memchr(id_start, '/', id_len) != NULL || id_len >= size)
        return 0;
    memcpy(id, id_start, id_len);
    id[id_len] = '\0';
    return 1;
}
