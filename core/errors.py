"""One error type for mistakes a user can fix, carrying what HTTP and the CLI need to report them."""

from __future__ import annotations


class ScalpelError(Exception):
    """A user-facing error: says what is wrong and where (field, file, line).

    `param` names the offending field or file, `status` is the HTTP status the server answers
    with, and `type`/`code` follow OpenAI's error object.
    """

    status = 400
    type = "invalid_request_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None, status: int | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        if status is not None:
            self.status = status

    def to_openai(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class NotFoundError(ScalpelError):
    status = 404
    type = "not_found_error"


class ConflictError(ScalpelError):
    status = 409
    type = "conflict_error"
