"""The one exception type a refusal travels in, from any layer to the HTTP answer."""


class ApiError(Exception):
    """A refusal the client can act on: HTTP status, a stable code, and a message saying what to do."""

    def __init__(self, status: int, code: str, message: str, **extra):
        super().__init__(message)
        self.status, self.code, self.message, self.extra = status, code, message, extra

    def body(self) -> dict:
        return {"error": {"code": self.code, "message": self.message, **self.extra}}
