"""``POST /v1/chat/completions``."""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field, ValidationInfo, field_validator
from pydantic.json_schema import JsonDict

from genserve.app.schemas.base import OpenAIBaseModel, UsageInfo
from genserve.app.schemas.provenance import Provenance
from genserve.app.schemas.sampling import SamplingFields
from genserve.models.text.sampling import SamplingParams

CHAT_EXAMPLE: JsonDict = {"model": "genserve-text-tiny", "messages": [
    {"role": "system", "content": "You are a helpful assistant that answers questions about Python."},
    {"role": "user", "content": "What does os.path.join do?"}], "max_completion_tokens": 48,
    "temperature": 0.7, "seed": 1}


class TextPart(OpenAIBaseModel):
    type: Literal["text"] = Field(description="only text parts are supported")
    text: str


class ChatMessage(OpenAIBaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ResponseFormat(OpenAIBaseModel):
    type: Literal["text"] = Field(description="structured outputs are not supported yet")


class ChatCompletionRequest(SamplingFields):
    model_config = ConfigDict(json_schema_extra={"examples": [CHAT_EXAMPLE]})

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="OpenAI's newer name for max_tokens; "
                                              "both with different values is a 400")
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value and not info.data.get("logprobs"):  # 0, like unset, asks for nothing
            raise ValueError("top_logprobs requires logprobs to be true")
        return value

    @field_validator("tools")
    @classmethod
    def _tools(cls, value: list[dict] | None) -> list[dict] | None:
        if value:
            raise ValueError("tools are not supported")
        return value

    def chat_messages(self) -> list[dict[str, str]]:
        # "developer" is OpenAI's newer name for the system role.
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                for m in self.messages]

    def to_sampling_params(self) -> SamplingParams:
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self.sampling_params(self.max_completion_tokens or self.max_tokens, logprobs)


class ChatTopLogprob(OpenAIBaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob] = Field(default_factory=list)


class ChatLogprobs(OpenAIBaseModel):
    content: list[ChatTokenLogprob] | None = None


class ChatMessageOut(OpenAIBaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatChoice(OpenAIBaseModel):
    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length", "content_filter"] | None = None


class ChatCompletionResponse(OpenAIBaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo | None = None
    system_fingerprint: str | None = None
    provenance: Provenance | None = Field(None, description="genserve's extension: what marks the output "
                                          "carries (docs/provenance.md)")
