/* MQTT 3.1.1 and 5.0 packet codec for the server side.
 *
 * A pure module: no I/O, no allocation, no event loop. The decoder frames
 * bytes read from a client and turns each frame into a struct whose strings
 * point into the caller's buffer (zero-copy), so the buffer must outlive the
 * decoded struct. The encoder writes server packets into a caller-provided
 * buffer. The session layer (keep alive, packet id state, topic alias maps,
 * authentication) sits on top and is not part of this module.
 *
 * Error codes are negative MQTT_E* values below -100, disjoint from the
 * ING_E* codes of core/errors.h, so one int carries either.
 */
#ifndef INGESTD_MQTT_CODEC_H
#define INGESTD_MQTT_CODEC_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define MQTT_V311 4 /* protocol level of MQTT 3.1.1 */
#define MQTT_V5 5   /* protocol level of MQTT 5.0 */

/* Largest value of a variable byte integer, and so of a remaining length. */
#define MQTT_VARINT_MAX 268435455u

/* User properties kept per property list. Further ones are validated and
 * counted in user_property_total but not stored (see mqtt_props_t). */
#define MQTT_MAX_USER_PROPERTIES 32

enum mqtt_packet_type {
    MQTT_CONNECT = 1,
    MQTT_CONNACK = 2,
    MQTT_PUBLISH = 3,
    MQTT_PUBACK = 4,
    MQTT_PUBREC = 5,
    MQTT_PUBREL = 6,
    MQTT_PUBCOMP = 7,
    MQTT_SUBSCRIBE = 8,
    MQTT_SUBACK = 9,
    MQTT_UNSUBSCRIBE = 10,
    MQTT_UNSUBACK = 11,
    MQTT_PINGREQ = 12,
    MQTT_PINGRESP = 13,
    MQTT_DISCONNECT = 14,
    MQTT_AUTH = 15,
};

/* MQTT 5.0 property identifiers. */
enum mqtt_property_id {
    MQTT_PROP_PAYLOAD_FORMAT = 0x01,
    MQTT_PROP_MESSAGE_EXPIRY = 0x02,
    MQTT_PROP_CONTENT_TYPE = 0x03,
    MQTT_PROP_RESPONSE_TOPIC = 0x08,
    MQTT_PROP_CORRELATION_DATA = 0x09,
    MQTT_PROP_SUBSCRIPTION_ID = 0x0b,
    MQTT_PROP_SESSION_EXPIRY = 0x11,
    MQTT_PROP_ASSIGNED_CLIENT_ID = 0x12,
    MQTT_PROP_SERVER_KEEP_ALIVE = 0x13,
    MQTT_PROP_AUTH_METHOD = 0x15,
    MQTT_PROP_AUTH_DATA = 0x16,
    MQTT_PROP_REQUEST_PROBLEM_INFO = 0x17,
    MQTT_PROP_WILL_DELAY = 0x18,
    MQTT_PROP_REQUEST_RESPONSE_INFO = 0x19,
    MQTT_PROP_RESPONSE_INFO = 0x1a,
    MQTT_PROP_SERVER_REFERENCE = 0x1c,
    MQTT_PROP_REASON_STRING = 0x1f,
    MQTT_PROP_RECEIVE_MAXIMUM = 0x21,
    MQTT_PROP_TOPIC_ALIAS_MAXIMUM = 0x22,
    MQTT_PROP_TOPIC_ALIAS = 0x23,
    MQTT_PROP_MAXIMUM_QOS = 0x24,
    MQTT_PROP_RETAIN_AVAILABLE = 0x25,
    MQTT_PROP_USER_PROPERTY = 0x26,
    MQTT_PROP_MAXIMUM_PACKET_SIZE = 0x27,
    MQTT_PROP_WILDCARD_SUB_AVAILABLE = 0x28,
    MQTT_PROP_SUBSCRIPTION_ID_AVAILABLE = 0x29,
    MQTT_PROP_SHARED_SUB_AVAILABLE = 0x2a,
};

/* MQTT 5.0 reason codes used by this module and its callers. */
enum mqtt_reason_code {
    MQTT_RC_SUCCESS = 0x00,
    MQTT_RC_GRANTED_QOS1 = 0x01,
    MQTT_RC_GRANTED_QOS2 = 0x02,
    MQTT_RC_DISCONNECT_WITH_WILL = 0x04,
    MQTT_RC_NO_MATCHING_SUBSCRIBERS = 0x10,
    MQTT_RC_NO_SUBSCRIPTION_EXISTED = 0x11,
    MQTT_RC_CONTINUE_AUTHENTICATION = 0x18,
    MQTT_RC_REAUTHENTICATE = 0x19,
    MQTT_RC_UNSPECIFIED = 0x80,
    MQTT_RC_MALFORMED_PACKET = 0x81,
    MQTT_RC_PROTOCOL_ERROR = 0x82,
    MQTT_RC_IMPLEMENTATION_SPECIFIC = 0x83,
    MQTT_RC_UNSUPPORTED_PROTOCOL_VERSION = 0x84,
    MQTT_RC_CLIENT_ID_NOT_VALID = 0x85,
    MQTT_RC_BAD_USERNAME_OR_PASSWORD = 0x86,
    MQTT_RC_NOT_AUTHORIZED = 0x87,
    MQTT_RC_SERVER_UNAVAILABLE = 0x88,
    MQTT_RC_SERVER_BUSY = 0x89,
    MQTT_RC_BAD_AUTH_METHOD = 0x8c,
    MQTT_RC_KEEP_ALIVE_TIMEOUT = 0x8d,
    MQTT_RC_SESSION_TAKEN_OVER = 0x8e,
    MQTT_RC_TOPIC_FILTER_INVALID = 0x8f,
    MQTT_RC_TOPIC_NAME_INVALID = 0x90,
    MQTT_RC_PACKET_ID_IN_USE = 0x91,
    MQTT_RC_PACKET_ID_NOT_FOUND = 0x92,
    MQTT_RC_RECEIVE_MAXIMUM_EXCEEDED = 0x93,
    MQTT_RC_TOPIC_ALIAS_INVALID = 0x94,
    MQTT_RC_PACKET_TOO_LARGE = 0x95,
    MQTT_RC_QUOTA_EXCEEDED = 0x97,
    MQTT_RC_PAYLOAD_FORMAT_INVALID = 0x99,
    MQTT_RC_QOS_NOT_SUPPORTED = 0x9b,
    MQTT_RC_SHARED_SUB_NOT_SUPPORTED = 0x9e,
    MQTT_RC_CONNECTION_RATE_EXCEEDED = 0x9f,
    MQTT_RC_MAXIMUM_CONNECT_TIME = 0xa0,
    MQTT_RC_SUB_ID_NOT_SUPPORTED = 0xa1,
    MQTT_RC_WILDCARD_SUB_NOT_SUPPORTED = 0xa2,
};

/* Decode errors. mqtt_error_reason() maps each one to the MQTT 5.0 reason
 * code the server sends in CONNACK or DISCONNECT, and mqtt_strerror() to a
 * sentence naming the fault. */
enum mqtt_error {
    /* Framing. */
    MQTT_E_REMAINING_LENGTH = -101,
    MQTT_E_PACKET_TOO_LARGE = -102,
    MQTT_E_PACKET_TYPE_RESERVED = -103,
    MQTT_E_AUTH_IN_V311 = -104,
    MQTT_E_SERVER_PACKET = -105,
    MQTT_E_HEADER_FLAGS = -106,
    MQTT_E_TRUNCATED = -107,
    MQTT_E_TRAILING_BYTES = -108,
    MQTT_E_VARINT = -109,
    MQTT_E_UTF8 = -110,
    MQTT_E_UTF8_NUL = -111,
    /* CONNECT. */
    MQTT_E_SECOND_CONNECT = -119, /* CONNECT on a connected session */
    MQTT_E_PROTOCOL_NAME = -120,
    MQTT_E_PROTOCOL_LEVEL = -121,
    MQTT_E_CONNECT_RESERVED = -122,
    MQTT_E_WILL_QOS = -123,
    MQTT_E_WILL_FLAGS = -124,
    MQTT_E_PASSWORD_WITHOUT_USERNAME = -125,
    MQTT_E_CLIENT_ID_EMPTY = -126,
    MQTT_E_WILL_TOPIC = -127,
    /* PUBLISH and acknowledgements. */
    MQTT_E_PUBLISH_QOS = -130,
    MQTT_E_PUBLISH_DUP = -131,
    MQTT_E_TOPIC_WILDCARD = -132,
    MQTT_E_TOPIC_EMPTY = -133,
    MQTT_E_PACKET_ID_ZERO = -134,
    MQTT_E_REASON_CODE = -135,
    /* SUBSCRIBE and UNSUBSCRIBE. */
    MQTT_E_SUBSCRIBE_EMPTY = -140,
    MQTT_E_SUBSCRIBE_QOS = -141,
    MQTT_E_RETAIN_HANDLING = -142,
    MQTT_E_SUBSCRIBE_RESERVED = -143,
    MQTT_E_FILTER_EMPTY = -144,
    MQTT_E_FILTER_WILDCARD = -145,
    MQTT_E_SHARED_FILTER = -146,
    MQTT_E_SHARED_NO_LOCAL = -147,
    MQTT_E_UNSUBSCRIBE_EMPTY = -148,
    /* Properties. */
    MQTT_E_PROPERTY_LENGTH = -150,
    MQTT_E_PROPERTY_UNKNOWN = -151,
    MQTT_E_PROPERTY_NOT_ALLOWED = -152,
    MQTT_E_PROPERTY_DUPLICATE = -153,
    MQTT_E_PROPERTY_VALUE = -154,
    MQTT_E_RECEIVE_MAXIMUM_ZERO = -155,
    MQTT_E_MAXIMUM_PACKET_SIZE_ZERO = -156,
    MQTT_E_TOPIC_ALIAS_ZERO = -157,
    MQTT_E_SUBSCRIPTION_ID_ZERO = -158,
    MQTT_E_SUBSCRIPTION_ID_FROM_CLIENT = -159,
    MQTT_E_RESPONSE_TOPIC = -160,
    MQTT_E_AUTH_DATA_WITHOUT_METHOD = -161,
};

/* A byte string inside a decoded buffer. `data` is NULL when the field was
 * absent, and points into the buffer (possibly with `len` 0) when present.
 * UTF-8 string fields were validated by the decoder. */
typedef struct mqtt_bytes {
    const uint8_t *data;
    size_t len;
} mqtt_bytes_t;

typedef struct mqtt_user_property {
    mqtt_bytes_t name;
    mqtt_bytes_t value;
} mqtt_user_property_t;

/* The MQTT 5.0 properties of one packet, or of a will message.
 *
 * Decoding sets bit (1 << id) of `present` for each property found. For
 * encoding, the caller sets those bits for the properties to send, except
 * user properties, which are sent when user_property_count > 0.
 * Fields keep their protocol meaning and units (seconds for intervals). */
typedef struct mqtt_props {
    uint64_t present;
    uint8_t payload_format;
    uint32_t message_expiry;
    mqtt_bytes_t content_type;
    mqtt_bytes_t response_topic;
    mqtt_bytes_t correlation_data;
    uint32_t subscription_id;
    uint32_t session_expiry;
    mqtt_bytes_t assigned_client_id;
    uint16_t server_keep_alive;
    mqtt_bytes_t auth_method;
    mqtt_bytes_t auth_data;
    uint8_t request_problem_info;
    uint32_t will_delay;
    uint8_t request_response_info;
    mqtt_bytes_t response_info;
    mqtt_bytes_t server_reference;
    mqtt_bytes_t reason_string;
    uint16_t receive_maximum;
    uint16_t topic_alias_maximum;
    uint16_t topic_alias;
    uint8_t maximum_qos;
    uint8_t retain_available;
    uint32_t maximum_packet_size;
    uint8_t wildcard_sub_available;
    uint8_t subscription_id_available;
    uint8_t shared_sub_available;
    /* Stored user properties, at most MQTT_MAX_USER_PROPERTIES. */
    size_t user_property_count;
    /* User properties in the packet; larger than user_property_count when
     * some were validated but dropped because the array was full. */
    size_t user_property_total;
    mqtt_user_property_t user_properties[MQTT_MAX_USER_PROPERTIES];
} mqtt_props_t;

/* Returns true if property `id` was decoded, or is marked for encoding. */
static inline bool mqtt_props_has(const mqtt_props_t *props, int id)
{
    return (props->present >> id) & 1u;
}

/* Marks property `id` as present, for encoding. */
static inline void mqtt_props_set(mqtt_props_t *props, int id)
{
    props->present |= UINT64_C(1) << id;
}

/* One complete packet found by mqtt_frame(). */
typedef struct mqtt_frame {
    uint8_t type;        /* packet type, the high nibble of byte 0 */
    uint8_t flags;       /* the low nibble of byte 0 */
    size_t header_len;   /* fixed header length, 2 to 5 bytes */
    size_t body_len;     /* remaining length */
    const uint8_t *body; /* variable header and payload, in the input */
} mqtt_frame_t;

typedef struct mqtt_connect {
    /* Protocol level: 4 or 5, or the rejected level (such as 3) after
     * MQTT_E_PROTOCOL_LEVEL, or 0 if the decoder did not reach it. The
     * session layer uses it to pick the CONNACK format for an error. */
    uint8_t version;
    bool clean_start; /* Clean Session in 3.1.1 */
    bool will;
    uint8_t will_qos;
    bool will_retain;
    uint16_t keep_alive; /* seconds, 0 disables keep alive */
    mqtt_bytes_t client_id;
    mqtt_props_t props;
    mqtt_props_t will_props;
    mqtt_bytes_t will_topic;   /* data is NULL without a will */
    mqtt_bytes_t will_payload; /* data is NULL without a will */
    mqtt_bytes_t username;     /* data is NULL without the flag */
    mqtt_bytes_t password;     /* data is NULL without the flag */
} mqtt_connect_t;

/* PUBLISH in either direction. For encoding, `dup`, `qos`, `retain`,
 * `topic`, `packet_id` (ignored for QoS 0), `props` and `payload` are
 * read. */
typedef struct mqtt_publish {
    bool dup;
    uint8_t qos;
    bool retain;
    mqtt_bytes_t topic; /* may be empty in 5.0 when a topic alias is set */
    uint16_t packet_id; /* 0 for QoS 0 */
    mqtt_props_t props;
    mqtt_bytes_t payload;
} mqtt_publish_t;

/* PUBACK, PUBREC, PUBREL or PUBCOMP. */
typedef struct mqtt_ack {
    uint8_t type;
    uint16_t packet_id;
    uint8_t reason_code; /* 0x00 when the packet carries none */
    mqtt_props_t props;
} mqtt_ack_t;

typedef struct mqtt_subscription {
    mqtt_bytes_t filter;
    uint8_t qos;
    bool no_local;
    bool retain_as_published;
    uint8_t retain_handling;
} mqtt_subscription_t;

/* SUBSCRIBE or UNSUBSCRIBE. The decoder validates every entry and stores
 * the raw list. mqtt_subscribe_next() and mqtt_unsubscribe_next() walk it,
 * so no limit on the number of filters is needed. */
typedef struct mqtt_subscribe {
    uint16_t packet_id;
    mqtt_props_t props;
    size_t count; /* number of entries, at least 1 */
    const uint8_t *list;
    size_t list_len;
} mqtt_subscribe_t;

/* DISCONNECT or AUTH. */
typedef struct mqtt_disconnect {
    uint8_t reason_code; /* 0x00 when the packet carries none */
    mqtt_props_t props;
} mqtt_disconnect_t;

typedef mqtt_disconnect_t mqtt_auth_t;

/* Any packet a server receives, as filled by mqtt_decode(). */
typedef struct mqtt_packet {
    uint8_t type;
    union {
        mqtt_connect_t connect;
        mqtt_publish_t publish;
        mqtt_ack_t ack;
        mqtt_subscribe_t subscribe; /* SUBSCRIBE and UNSUBSCRIBE */
        mqtt_disconnect_t disconnect;
        mqtt_auth_t auth;
    } u;
} mqtt_packet_t;

/* CONNACK for encoding. In 3.1.1 `reason_code` is the return code (0x00 to
 * 0x05) and `props` is ignored. */
typedef struct mqtt_connack {
    bool session_present;
    uint8_t reason_code;
    mqtt_props_t props;
} mqtt_connack_t;

/* SUBACK or UNSUBACK for encoding. An MQTT 3.1.1 UNSUBACK has no codes, so
 * `codes` and `count` are ignored for it. */
typedef struct mqtt_suback {
    uint16_t packet_id;
    mqtt_props_t props;
    const uint8_t *codes;
    size_t count;
} mqtt_suback_t;

/* Finds the first packet in `buf`.
 *
 * `max_packet` is the largest total packet size accepted, fixed header
 * included, or 0 for the protocol limit. A non-minimal remaining length
 * (such as 0x80 0x00 for 0) is accepted.
 * Returns MQTT_NEED_MORE (0) when `buf` contains no complete packet yet, the
 * total packet length (header_len + body_len) with `out` filled, or
 * MQTT_E_PACKET_TYPE_RESERVED (type 0), MQTT_E_REMAINING_LENGTH (over 4
 * bytes) or MQTT_E_PACKET_TOO_LARGE. The size check runs as soon as the
 * remaining length is complete, before the body has arrived. Packet type 15
 * (AUTH) in MQTT 3.1.1 is rejected by mqtt_decode(), which knows the
 * version. */
#define MQTT_NEED_MORE 0
int mqtt_frame(const uint8_t *buf, size_t len, size_t max_packet,
               mqtt_frame_t *out);

/* Decodes any packet a server may receive, after checking its fixed header
 * flags. `version` is the session's protocol level (MQTT_V311 or MQTT_V5)
 * and is ignored for CONNECT, which carries its own.
 * Returns 0 with out->type set, ING_EINVAL for a bad `version`, or an
 * MQTT_E* code. Server-only packet types give MQTT_E_SERVER_PACKET. */
int mqtt_decode(const mqtt_frame_t *frame, int version, mqtt_packet_t *out);

/* Decodes a CONNECT. Returns 0 or an MQTT_E* code. On error out->version
 * gives the CONNACK format to reply with (see mqtt_connect_t). */
int mqtt_decode_connect(const mqtt_frame_t *frame, mqtt_connect_t *out);

/* Decodes a PUBLISH sent by a client. A Subscription Identifier property is
 * rejected because only servers may send it. Returns 0 or an MQTT_E*
 * code. */
int mqtt_decode_publish(const mqtt_frame_t *frame, int version,
                        mqtt_publish_t *out);

/* Decodes a PUBACK, PUBREC, PUBREL or PUBCOMP. In 5.0 the reason code must
 * be one the spec allows for that packet. Returns 0 or an MQTT_E* code. */
int mqtt_decode_ack(const mqtt_frame_t *frame, int version, mqtt_ack_t *out);

/* Decodes a SUBSCRIBE, validating every filter and its options.
 * Returns 0 or an MQTT_E* code. */
int mqtt_decode_subscribe(const mqtt_frame_t *frame, int version,
                          mqtt_subscribe_t *out);

/* Decodes an UNSUBSCRIBE, validating every filter.
 * Returns 0 or an MQTT_E* code. */
int mqtt_decode_unsubscribe(const mqtt_frame_t *frame, int version,
                            mqtt_subscribe_t *out);

/* Decodes a DISCONNECT. A 3.1.1 DISCONNECT must be empty. The session layer
 * still has to reject a non-zero Session Expiry Interval when CONNECT set
 * it to 0. Returns 0 or an MQTT_E* code. */
int mqtt_decode_disconnect(const mqtt_frame_t *frame, int version,
                           mqtt_disconnect_t *out);

/* Decodes an AUTH, which exists only in 5.0. Returns 0 or an MQTT_E*
 * code. */
int mqtt_decode_auth(const mqtt_frame_t *frame, int version,
                     mqtt_auth_t *out);

/* Reads the next entry of a decoded SUBSCRIBE into `out`. `offset` starts at
 * 0 and is advanced. Returns true while an entry was read. */
bool mqtt_subscribe_next(const mqtt_subscribe_t *sub, size_t *offset,
                         mqtt_subscription_t *out);

/* Reads the next filter of a decoded UNSUBSCRIBE, as mqtt_subscribe_next()
 * does. */
bool mqtt_unsubscribe_next(const mqtt_subscribe_t *unsub, size_t *offset,
                           mqtt_bytes_t *filter);

/* Checks that `len` bytes are UTF-8 as MQTT requires: well-formed (no
 * overlong forms, no surrogates U+D800..U+DFFF, nothing above U+10FFFF) and
 * without U+0000. Other control characters are accepted because the spec
 * only says SHOULD NOT for them. Returns 0, MQTT_E_UTF8 or
 * MQTT_E_UTF8_NUL. Useful for a payload with Payload Format Indicator 1. */
int mqtt_utf8_check(const uint8_t *s, size_t len);

/* Returns the MQTT 5.0 reason code for an MQTT_E* code, for CONNACK or
 * DISCONNECT. Other negative codes give 0x80 (Unspecified error). */
uint8_t mqtt_error_reason(int code);

/* Returns the MQTT 3.1.1 CONNACK return code for a CONNECT decode error:
 * 0x01 (unacceptable protocol version) or 0x02 (identifier rejected), or -1
 * when 3.1.1 requires closing the connection without a CONNACK. */
int mqtt_error_connack_v311(int code);

/* Returns a static sentence describing an MQTT_E* or ING_E* code. */
const char *mqtt_strerror(int code);

/* Encoders for server packets.
 *
 * Each writes one packet into `buf` of `cap` bytes and returns its length.
 * When the packet is longer than `cap`, nothing is written and the needed
 * length is returned, as snprintf does, so a caller compares the result
 * with `cap`. `max_packet` is the client's Maximum Packet Size, or 0 for
 * none. To stay within it an encoder drops the Reason String first and
 * then all User Properties, except in PUBLISH, whose properties belong to
 * the message. Returns MQTT_E_PACKET_TOO_LARGE when the packet still does
 * not fit, and ING_EINVAL for invalid input: a bad version, QoS, reason
 * code or packet id, a string over 65,535 bytes, or a property that the
 * packet type cannot carry. Strings are not checked for UTF-8. */
int mqtt_encode_connack(uint8_t *buf, size_t cap, int version,
                        const mqtt_connack_t *connack, size_t max_packet);
int mqtt_encode_publish(uint8_t *buf, size_t cap, int version,
                        const mqtt_publish_t *publish, size_t max_packet);
/* `ack->type` picks PUBACK, PUBREC, PUBREL or PUBCOMP. In 5.0 the reason
 * code and property length are left out when the code is 0x00 and no
 * property is sent. */
int mqtt_encode_ack(uint8_t *buf, size_t cap, int version,
                    const mqtt_ack_t *ack, size_t max_packet);
/* In 3.1.1 the codes must be 0x00, 0x01, 0x02 or 0x80. */
int mqtt_encode_suback(uint8_t *buf, size_t cap, int version,
                       const mqtt_suback_t *suback, size_t max_packet);
int mqtt_encode_unsuback(uint8_t *buf, size_t cap, int version,
                         const mqtt_suback_t *unsuback, size_t max_packet);
int mqtt_encode_pingresp(uint8_t *buf, size_t cap);
/* Only 5.0 servers send DISCONNECT, so version 4 gives ING_EINVAL. */
int mqtt_encode_disconnect(uint8_t *buf, size_t cap, int version,
                           const mqtt_disconnect_t *disconnect,
                           size_t max_packet);
/* AUTH, for enhanced authentication in 5.0. */
int mqtt_encode_auth(uint8_t *buf, size_t cap, int version,
                     const mqtt_auth_t *auth, size_t max_packet);

#endif
