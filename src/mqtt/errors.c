/* Descriptions and reason codes for the MQTT decode errors. */
#include <stddef.h>
#include <stdint.h>

#include "core/errors.h"
#include "mqtt/codec.h"

#define MALFORMED MQTT_RC_MALFORMED_PACKET
#define PROTOCOL MQTT_RC_PROTOCOL_ERROR

struct error_info {
    int code;
    uint8_t reason;
    const char *message;
};

/* The MQTT 5.0 spec calls a packet that cannot be parsed Malformed (0x81).
 * A packet that parses but breaks a rule is a Protocol Error (0x82). The
 * spec also names the more specific codes used below. */
static const struct error_info errors[] = {
    {MQTT_E_REMAINING_LENGTH, MALFORMED,
     "remaining length is longer than 4 bytes"},
    {MQTT_E_PACKET_TOO_LARGE, MQTT_RC_PACKET_TOO_LARGE,
     "packet is larger than the maximum packet size"},
    {MQTT_E_PACKET_TYPE_RESERVED, MALFORMED, "packet type 0 is reserved"},
    {MQTT_E_AUTH_IN_V311, PROTOCOL, "AUTH packet is not part of MQTT 3.1.1"},
    {MQTT_E_SERVER_PACKET, PROTOCOL,
     "packet type is only sent by servers (CONNACK, SUBACK, UNSUBACK or "
     "PINGRESP)"},
    {MQTT_E_HEADER_FLAGS, MALFORMED,
     "fixed header flags are invalid for the packet type"},
    {MQTT_E_SECOND_CONNECT, PROTOCOL,
     "a second CONNECT is a protocol error"},
    {MQTT_E_TRUNCATED, MALFORMED,
     "a field runs past the end of the packet"},
    {MQTT_E_TRAILING_BYTES, MALFORMED,
     "packet has bytes after its last field"},
    {MQTT_E_VARINT, MALFORMED,
     "variable byte integer is longer than 4 bytes"},
    {MQTT_E_UTF8, MALFORMED,
     "string is not well-formed UTF-8 (invalid byte, overlong form, "
     "surrogate or truncated sequence)"},
    {MQTT_E_UTF8_NUL, MALFORMED, "string contains the null character U+0000"},
    {MQTT_E_PROTOCOL_NAME, MQTT_RC_UNSUPPORTED_PROTOCOL_VERSION,
     "CONNECT protocol name is not MQTT"},
    {MQTT_E_PROTOCOL_LEVEL, MQTT_RC_UNSUPPORTED_PROTOCOL_VERSION,
     "CONNECT protocol level is not 4 (MQTT 3.1.1) or 5 (MQTT 5.0)"},
    {MQTT_E_CONNECT_RESERVED, MALFORMED,
     "CONNECT reserved flag (bit 0) is set"},
    {MQTT_E_WILL_QOS, MALFORMED, "CONNECT will QoS is 3"},
    {MQTT_E_WILL_FLAGS, MALFORMED,
     "CONNECT sets will QoS or will retain without the will flag"},
    {MQTT_E_PASSWORD_WITHOUT_USERNAME, MALFORMED,
     "CONNECT sets the password flag without the user name flag, which "
     "MQTT 3.1.1 forbids"},
    {MQTT_E_CLIENT_ID_EMPTY, MQTT_RC_CLIENT_ID_NOT_VALID,
     "CONNECT client identifier is empty while clean session is 0"},
    {MQTT_E_WILL_TOPIC, MQTT_RC_TOPIC_NAME_INVALID,
     "CONNECT will topic is empty or contains a wildcard"},
    {MQTT_E_PUBLISH_QOS, MALFORMED, "PUBLISH QoS is 3"},
    {MQTT_E_PUBLISH_DUP, MALFORMED, "PUBLISH sets DUP with QoS 0"},
    {MQTT_E_TOPIC_WILDCARD, MQTT_RC_TOPIC_NAME_INVALID,
     "PUBLISH topic name contains a wildcard"},
    {MQTT_E_TOPIC_EMPTY, PROTOCOL,
     "PUBLISH topic name is empty and no topic alias is set"},
    {MQTT_E_PACKET_ID_ZERO, PROTOCOL, "packet identifier is 0"},
    {MQTT_E_REASON_CODE, PROTOCOL,
     "reason code is not valid for the packet type"},
    {MQTT_E_SUBSCRIBE_EMPTY, PROTOCOL, "SUBSCRIBE contains no topic filter"},
    {MQTT_E_SUBSCRIBE_QOS, PROTOCOL, "SUBSCRIBE requests QoS 3"},
    {MQTT_E_RETAIN_HANDLING, PROTOCOL, "SUBSCRIBE retain handling is 3"},
    {MQTT_E_SUBSCRIBE_RESERVED, MALFORMED,
     "SUBSCRIBE options have reserved bits set"},
    {MQTT_E_FILTER_EMPTY, MQTT_RC_TOPIC_FILTER_INVALID,
     "topic filter is empty"},
    {MQTT_E_FILTER_WILDCARD, MQTT_RC_TOPIC_FILTER_INVALID,
     "topic filter has a wildcard that is not a whole level, or a '#' that "
     "is not the last level"},
    {MQTT_E_SHARED_FILTER, MQTT_RC_TOPIC_FILTER_INVALID,
     "shared subscription filter is not $share/{name}/{filter} with a "
     "non-empty name free of wildcards"},
    {MQTT_E_SHARED_NO_LOCAL, PROTOCOL,
     "SUBSCRIBE sets No Local on a shared subscription"},
    {MQTT_E_UNSUBSCRIBE_EMPTY, PROTOCOL,
     "UNSUBSCRIBE contains no topic filter"},
    {MQTT_E_PROPERTY_LENGTH, MALFORMED,
     "property list runs past the end of the packet, or a property past the "
     "end of its list"},
    {MQTT_E_PROPERTY_UNKNOWN, MALFORMED, "property identifier is unknown"},
    {MQTT_E_PROPERTY_NOT_ALLOWED, MALFORMED,
     "property is not allowed in this packet type"},
    {MQTT_E_PROPERTY_DUPLICATE, PROTOCOL,
     "property that may appear once appears twice"},
    {MQTT_E_PROPERTY_VALUE, PROTOCOL,
     "property value is out of range (a flag that is not 0 or 1)"},
    {MQTT_E_RECEIVE_MAXIMUM_ZERO, PROTOCOL, "Receive Maximum is 0"},
    {MQTT_E_MAXIMUM_PACKET_SIZE_ZERO, PROTOCOL, "Maximum Packet Size is 0"},
    {MQTT_E_TOPIC_ALIAS_ZERO, MQTT_RC_TOPIC_ALIAS_INVALID,
     "Topic Alias is 0"},
    {MQTT_E_SUBSCRIPTION_ID_ZERO, PROTOCOL, "Subscription Identifier is 0"},
    {MQTT_E_SUBSCRIPTION_ID_FROM_CLIENT, PROTOCOL,
     "PUBLISH from a client contains a Subscription Identifier"},
    {MQTT_E_RESPONSE_TOPIC, PROTOCOL,
     "Response Topic is empty or contains a wildcard"},
    {MQTT_E_AUTH_DATA_WITHOUT_METHOD, PROTOCOL,
     "Authentication Data is present without an Authentication Method"},
};

static const struct error_info *find(int code)
{
    for (size_t i = 0; i < sizeof(errors) / sizeof(errors[0]); i++) {
        if (errors[i].code == code)
            return &errors[i];
    }
    return NULL;
}

uint8_t mqtt_error_reason(int code)
{
    const struct error_info *info = find(code);

    return info != NULL ? info->reason : MQTT_RC_UNSPECIFIED;
}

int mqtt_error_connack_v311(int code)
{
    switch (code) {
    case MQTT_E_PROTOCOL_LEVEL:
        return 0x01;
    case MQTT_E_CLIENT_ID_EMPTY:
        return 0x02;
    }
    return -1;
}

const char *mqtt_strerror(int code)
{
    const struct error_info *info = find(code);

    return info != NULL ? info->message : ing_strerror(code);
}
