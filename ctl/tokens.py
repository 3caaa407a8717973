"""The broker's session tokens: minted and checked with the state directory's HMAC key."""
import base64
import binascii
import hashlib
import hmac


class TokenSigner:
    """Mints and checks `ctl1.<payload>.<mac>` tokens; payload = v1|peer_id|generation|role|scope|expires."""

    PREFIX = b"ctl-token:"

    def __init__(self, key: str):
        self._key = key.encode()
        self._verified = {}          # token -> claims: a MAC is checked once per token, not once per request

    def _mac(self, payload: bytes) -> bytes:
        return hmac.new(self._key, self.PREFIX + payload, hashlib.sha256).digest()

    def mint(self, peer_id: int, generation: int, role: str, scope: str, expires: int) -> str:
        payload = base64.urlsafe_b64encode(f"v1|{peer_id}|{generation}|{role}|{scope}|{expires}".encode())
        mac = base64.urlsafe_b64encode(self._mac(payload))
        return f"ctl1.{payload.decode()}.{mac.decode()}"

    def claims(self, token: str):
        """(peer_id, generation, role, scope, expires) if the token is genuine; see _check."""
        if token in self._verified:
            return self._verified[token]
        found = self._check(token)
        if found is not None:
            if len(self._verified) >= 4096:
                self._verified.clear()
            self._verified[token] = found
        return found

    def _check(self, token: str):
        """(peer_id, generation, role, scope, expires) if the MAC is right and the token is spelled exactly
        as minted (one canonical spelling: no padding games, no stray characters), else None."""
        parts = token.split(".")
        if len(parts) != 3 or parts[0] != "ctl1" or len(token) > 512:
            return None
        try:
            payload = parts[1].encode("ascii")
            expected = base64.urlsafe_b64encode(self._mac(payload))
            if not hmac.compare_digest(parts[2].encode("ascii"), expected):
                return None
            if base64.urlsafe_b64encode(base64.urlsafe_b64decode(payload)) != payload:
                return None
            version, peer_id, generation, role, scope, expires = \
                base64.urlsafe_b64decode(payload).decode("ascii").split("|")
            if version != "v1":
                return None
            return int(peer_id), int(generation), role, scope, int(expires)
        except (ValueError, UnicodeError, binascii.Error):
            return None
