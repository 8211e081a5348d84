/* The global MQTT session table, shared by every worker loop.
 *
 * One mutex guards the table and every state in it. A state belongs to a
 * client identifier and outlives its connections: a reconnect without
 * clean start finds the QoS 2 packet ids still awaiting PUBREL and the
 * feedback subscriptions. A state may be referenced by an old connection
 * still finishing its pipeline batches and by the new one at the same
 * time; both write through the mutex, so a QoS 2 message that becomes
 * durable after a takeover is still known to the new connection.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <pthread.h>

#include "core/errors.h"
#include "core/log.h"
#include "mqtt/session.h"

#define TABLE_BUCKETS 1024
#define PURGE_INTERVAL_MS 1000

struct mqtt_state {
    mqtt_state_t *next; /* in its bucket */
    char client_id[MQTT_CLIENT_ID_MAX + 1];
    char device_id[AUTH_DEVICE_ID_MAX + 1];
    int refs;     /* the table while listed, plus each attached session */
    int in_table;
    mqtt_session_t *owner; /* NULL while disconnected */
    mqtt_listener_t *owner_listener;
    uint64_t owner_id;
    uint32_t expiry_s;
    uint64_t disconnected_ms;

    uint16_t *qos2;
    size_t qos2_count, qos2_cap;
    uint16_t *qos1; /* stored QoS 1 packet ids, oldest first */
    size_t qos1_count, qos1_cap;
    char **filters;
    size_t filter_count;
};

static pthread_mutex_t table_lock = PTHREAD_MUTEX_INITIALIZER;
static mqtt_state_t *buckets[TABLE_BUCKETS];
static uint64_t last_purge_ms;
static size_t subscribed_states; /* states with at least one filter */

static uint64_t now_ms(void)
{
    return uv_hrtime() / 1000000u;
}

static size_t bucket_of(const char *client_id)
{
    uint32_t h = 2166136261u; /* FNV-1a */

    for (const unsigned char *p = (const unsigned char *)client_id; *p; p++)
        h = (h ^ *p) * 16777619u;
    return h % TABLE_BUCKETS;
}

static void state_free(mqtt_state_t *st)
{
    for (size_t i = 0; i < st->filter_count; i++)
        free(st->filters[i]);
    if (st->filter_count > 0)
        subscribed_states--;
    free(st->filters);
    free(st->qos2);
    free(st->qos1);
    free(st);
}

static void state_unref(mqtt_state_t *st)
{
    if (--st->refs == 0)
        state_free(st);
}

static void unlink_state(mqtt_state_t *st)
{
    mqtt_state_t **pp = &buckets[bucket_of(st->client_id)];

    while (*pp != NULL && *pp != st)
        pp = &(*pp)->next;
    if (*pp == st)
        *pp = st->next;
    st->next = NULL;
    st->in_table = 0;
    state_unref(st);
}

/* Removes disconnected states whose expiry passed. Called with the lock
 * held, at most once per PURGE_INTERVAL_MS. */
static void purge_expired(uint64_t now)
{
    if (now - last_purge_ms < PURGE_INTERVAL_MS)
        return;
    last_purge_ms = now;
    for (size_t b = 0; b < TABLE_BUCKETS; b++) {
        mqtt_state_t *st = buckets[b];
        while (st != NULL) {
            mqtt_state_t *next = st->next;
            if (st->owner == NULL &&
                now - st->disconnected_ms >= (uint64_t)st->expiry_s * 1000u) {
                log_debug("mqtt session expired", "client=%s device=%s",
                          st->client_id, st->device_id);
                unlink_state(st);
            }
            st = next;
        }
    }
}

static mqtt_state_t *find_state(const char *client_id)
{
    mqtt_state_t *st = buckets[bucket_of(client_id)];

    while (st != NULL && strcmp(st->client_id, client_id) != 0)
        st = st->next;
    return st;
}

static mqtt_state_t *new_state(const mqtt_session_t *s)
{
    mqtt_state_t *st = calloc(1, sizeof(*st));
    size_t b;

    if (st == NULL)
        return NULL;
    snprintf(st->client_id, sizeof(st->client_id), "%s", s->client_id);
    snprintf(st->device_id, sizeof(st->device_id), "%s", s->device.id);
    b = bucket_of(st->client_id);
    st->next = buckets[b];
    buckets[b] = st;
    st->in_table = 1;
    st->refs = 1;
    return st;
}

/* Sends takeover mail to the state's current owner, if any, and forgets
 * it. Called with the lock held. */
static void kick_owner(mqtt_state_t *st)
{
    mqtt_mail_t *mail;

    if (st->owner == NULL)
        return;
    mail = calloc(1, sizeof(*mail));
    if (mail != NULL) {
        mail->kind = MQTT_MAIL_TAKEOVER;
        mail->session = st->owner;
        mail->session_id = st->owner_id;
        mqtt_listener_post(st->owner_listener, mail);
    }
    st->owner = NULL;
    st->owner_listener = NULL;
    st->disconnected_ms = now_ms();
}

int mqtt_table_attach(mqtt_session_t *s, bool clean, uint32_t expiry,
                      mqtt_state_t **out, bool *present)
{
    mqtt_state_t *st;
    int rc = 0;

    *present = false;
    pthread_mutex_lock(&table_lock);
    purge_expired(now_ms());
    st = find_state(s->client_id);
    if (st != NULL && strcmp(st->device_id, s->device.id) != 0) {
        /* A device must not take over, or read the state of, another
         * device's session. */
        rc = ING_EEXIST;
        goto done;
    }
    if (st != NULL) {
        kick_owner(st);
        if (clean) {
            unlink_state(st);
            st = NULL;
        } else {
            *present = true;
        }
    }
    if (st == NULL) {
        st = new_state(s);
        if (st == NULL) {
            rc = ING_ENOMEM;
            goto done;
        }
    }
    st->owner = s;
    st->owner_listener = s->listener;
    st->owner_id = s->id;
    st->expiry_s = expiry;
    st->refs++;
    *out = st;
done:
    pthread_mutex_unlock(&table_lock);
    return rc;
}

int mqtt_table_owned(const char *client_id, const char *device_id)
{
    mqtt_state_t *st;
    int owned;

    pthread_mutex_lock(&table_lock);
    st = find_state(client_id);
    owned = st != NULL && st->owner != NULL &&
            strcmp(st->device_id, device_id) == 0;
    pthread_mutex_unlock(&table_lock);
    return owned;
}

void mqtt_table_detach(mqtt_session_t *s)
{
    mqtt_state_t *st = s->state;

    /* Every session that counted against its device's connection limit
     * passes here once, whether it attached a state or not. */
    if (s->device_counted) {
        s->device_counted = 0;
        limits_device_disconnect(s->listener->limits, s->device.id);
    }
    if (st == NULL)
        return;
    s->state = NULL;
    pthread_mutex_lock(&table_lock);
    if (st->owner == s) {
        st->owner = NULL;
        st->owner_listener = NULL;
        st->disconnected_ms = now_ms();
        if (st->expiry_s == 0 && st->in_table)
            unlink_state(st);
    }
    state_unref(st);
    pthread_mutex_unlock(&table_lock);
}

mqtt_state_t *mqtt_state_ref(mqtt_state_t *st)
{
    pthread_mutex_lock(&table_lock);
    st->refs++;
    pthread_mutex_unlock(&table_lock);
    return st;
}

void mqtt_state_unref(mqtt_state_t *st)
{
    pthread_mutex_lock(&table_lock);
    state_unref(st);
    pthread_mutex_unlock(&table_lock);
}

void mqtt_table_set_expiry(mqtt_state_t *st, uint32_t expiry)
{
    pthread_mutex_lock(&table_lock);
    st->expiry_s = expiry;
    pthread_mutex_unlock(&table_lock);
}

int mqtt_state_qos2_has(mqtt_state_t *st, uint16_t id)
{
    int found = 0;

    pthread_mutex_lock(&table_lock);
    for (size_t i = 0; i < st->qos2_count && !found; i++)
        found = st->qos2[i] == id;
    pthread_mutex_unlock(&table_lock);
    return found;
}

int mqtt_state_qos2_add(mqtt_state_t *st, uint16_t id)
{
    int rc = 0;

    pthread_mutex_lock(&table_lock);
    for (size_t i = 0; i < st->qos2_count; i++) {
        if (st->qos2[i] == id)
            goto done;
    }
    if (st->qos2_count == st->qos2_cap) {
        size_t cap = st->qos2_cap ? st->qos2_cap * 2 : 8;
        uint16_t *grown = realloc(st->qos2, cap * sizeof(*grown));
        if (grown == NULL) {
            rc = ING_ENOMEM;
            goto done;
        }
        st->qos2 = grown;
        st->qos2_cap = cap;
    }
    st->qos2[st->qos2_count++] = id;
done:
    pthread_mutex_unlock(&table_lock);
    return rc;
}

int mqtt_state_qos2_remove(mqtt_state_t *st, uint16_t id)
{
    int found = 0;

    pthread_mutex_lock(&table_lock);
    for (size_t i = 0; i < st->qos2_count; i++) {
        if (st->qos2[i] == id) {
            st->qos2[i] = st->qos2[--st->qos2_count];
            found = 1;
            break;
        }
    }
    pthread_mutex_unlock(&table_lock);
    return found;
}

int mqtt_state_qos1_has(mqtt_state_t *st, uint16_t id)
{
    int found = 0;

    pthread_mutex_lock(&table_lock);
    for (size_t i = 0; i < st->qos1_count && !found; i++)
        found = st->qos1[i] == id;
    pthread_mutex_unlock(&table_lock);
    return found;
}

static void qos1_remove_locked(mqtt_state_t *st, uint16_t id)
{
    for (size_t i = 0; i < st->qos1_count; i++) {
        if (st->qos1[i] == id) {
            memmove(&st->qos1[i], &st->qos1[i + 1],
                    (st->qos1_count - i - 1) * sizeof(*st->qos1));
            st->qos1_count--;
            return;
        }
    }
}

int mqtt_state_qos1_add(mqtt_state_t *st, uint16_t id, size_t max)
{
    int rc = 0;

    pthread_mutex_lock(&table_lock);
    qos1_remove_locked(st, id);
    if (st->qos1_count >= max && st->qos1_count > 0) {
        memmove(st->qos1, st->qos1 + 1,
                (st->qos1_count - 1) * sizeof(*st->qos1));
        st->qos1_count--;
    }
    if (st->qos1_count == st->qos1_cap) {
        size_t cap = st->qos1_cap ? st->qos1_cap * 2 : 8;
        uint16_t *grown = realloc(st->qos1, cap * sizeof(*grown));
        if (grown == NULL) {
            rc = ING_ENOMEM;
            goto done;
        }
        st->qos1 = grown;
        st->qos1_cap = cap;
    }
    st->qos1[st->qos1_count++] = id;
done:
    pthread_mutex_unlock(&table_lock);
    return rc;
}

void mqtt_state_qos1_remove(mqtt_state_t *st, uint16_t id)
{
    pthread_mutex_lock(&table_lock);
    qos1_remove_locked(st, id);
    pthread_mutex_unlock(&table_lock);
}

int mqtt_state_subscribe(mqtt_state_t *st, const char *filter, size_t max)
{
    char **grown;
    int rc = 0;

    pthread_mutex_lock(&table_lock);
    for (size_t i = 0; i < st->filter_count; i++) {
        if (strcmp(st->filters[i], filter) == 0)
            goto done;
    }
    if (st->filter_count >= max) {
        rc = ING_EFULL;
        goto done;
    }
    grown = realloc(st->filters, (st->filter_count + 1) * sizeof(*grown));
    if (grown == NULL) {
        rc = ING_ENOMEM;
        goto done;
    }
    st->filters = grown;
    st->filters[st->filter_count] = strdup(filter);
    if (st->filters[st->filter_count] == NULL) {
        rc = ING_ENOMEM;
        goto done;
    }
    if (st->filter_count++ == 0)
        subscribed_states++;
done:
    pthread_mutex_unlock(&table_lock);
    return rc;
}

int mqtt_state_unsubscribe(mqtt_state_t *st, const char *filter)
{
    int found = 0;

    pthread_mutex_lock(&table_lock);
    for (size_t i = 0; i < st->filter_count; i++) {
        if (strcmp(st->filters[i], filter) == 0) {
            free(st->filters[i]);
            st->filters[i] = st->filters[--st->filter_count];
            if (st->filter_count == 0)
                subscribed_states--;
            found = 1;
            break;
        }
    }
    pthread_mutex_unlock(&table_lock);
    return found;
}

static int state_wants(const mqtt_state_t *st, const char *topic)
{
    for (size_t i = 0; i < st->filter_count; i++) {
        if (mqtt_topic_matches(st->filters[i], topic))
            return 1;
    }
    return 0;
}

static void post_feedback(mqtt_state_t *st, const char *topic,
                          const char *payload, size_t len)
{
    mqtt_mail_t *mail = calloc(1, sizeof(*mail));

    if (mail == NULL)
        return;
    mail->kind = MQTT_MAIL_FEEDBACK;
    mail->session = st->owner;
    mail->session_id = st->owner_id;
    mail->topic = strdup(topic);
    mail->payload = malloc(len ? len : 1);
    if (mail->topic == NULL || mail->payload == NULL) {
        free(mail->topic);
        free(mail->payload);
        free(mail);
        return;
    }
    memcpy(mail->payload, payload, len);
    mail->len = len;
    mqtt_listener_post(st->owner_listener, mail);
}

void mqtt_feedback_publish(const char *device_id, const char *payload,
                           size_t len)
{
    char topic[AUTH_DEVICE_ID_MAX + 32];

    snprintf(topic, sizeof(topic), "devices/%s/errors", device_id);
    pthread_mutex_lock(&table_lock);
    /* NOTE: this scans the whole table; an index by device would make a
     * rejection cheaper when many sessions subscribe. */
    for (size_t b = 0; b < TABLE_BUCKETS && subscribed_states > 0; b++) {
        for (mqtt_state_t *st = buckets[b]; st != NULL; st = st->next) {
            if (st->owner != NULL && strcmp(st->device_id, device_id) == 0 &&
                state_wants(st, topic))
                post_feedback(st, topic, payload, len);
        }
    }
    pthread_mutex_unlock(&table_lock);
}
