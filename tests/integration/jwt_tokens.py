"""Makes JSON Web Tokens for the integration tests with python3-cryptography.

Tokens are built by hand instead of with a JWT library, so that tests can
also make the malformed and hostile tokens a library refuses to produce.
"""

import base64
import hashlib
import hmac
import json
import time

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature)


def b64url(data):
    """Encode bytes as base64url without padding."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(text):
    """Decode unpadded base64url."""
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def new_key(alg):
    """Return a new private key for RS256, ES256 or EdDSA."""
    if alg == "RS256":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if alg == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    if alg == "EdDSA":
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(alg)


def public_pem(key):
    """Return the PEM SubjectPublicKeyInfo of a private key."""
    return key.public_key().public_bytes(
        serialization.Encoding.PEM,
        serialization.PublicFormat.SubjectPublicKeyInfo)


def sign(alg, key, data):
    """Return the JWS signature of `data` for `alg`. `key` is a private key,
    or the HMAC key bytes for HS256."""
    if alg == "HS256":
        return hmac.new(key, data, hashlib.sha256).digest()
    if alg == "RS256":
        return key.sign(data, padding.PKCS1v15(), hashes.SHA256())
    if alg == "ES256":
        r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")
    if alg == "EdDSA":
        return key.sign(data)
    raise ValueError(alg)


def token(sign_alg, key, sub, exp_in=300, header=None, **claims):
    """Return a compact JWS. The header defaults to {"alg": sign_alg}, and
    the claims to sub and exp = now + exp_in (None leaves exp out)."""
    head = header if header is not None else {"alg": sign_alg, "typ": "JWT"}
    body = {"sub": sub}
    if exp_in is not None:
        body["exp"] = int(time.time()) + exp_in
    body.update(claims)
    signing_input = (b64url(json.dumps(head).encode()) + "." +
                     b64url(json.dumps(body).encode()))
    return signing_input + "." + b64url(sign(sign_alg, key,
                                             signing_input.encode()))
