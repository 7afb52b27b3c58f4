from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Action(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ACTION_NONE: _ClassVar[Action]
    ACTION_RETRY: _ClassVar[Action]
    ACTION_REFRESH_TOKEN: _ClassVar[Action]
    ACTION_UPDATE_APP: _ClassVar[Action]
    ACTION_RECONNECT: _ClassVar[Action]
    ACTION_RESUBSCRIBE: _ClassVar[Action]
ACTION_NONE: Action
ACTION_RETRY: Action
ACTION_REFRESH_TOKEN: Action
ACTION_UPDATE_APP: Action
ACTION_RECONNECT: Action
ACTION_RESUBSCRIBE: Action

class Command(_message.Message):
    __slots__ = ("id", "connect", "subscribe", "unsubscribe", "publish", "history", "refresh", "ping", "presence", "presence_stats", "typing", "user_status", "app_state", "register_device", "unregister_device")
    ID_FIELD_NUMBER: _ClassVar[int]
    CONNECT_FIELD_NUMBER: _ClassVar[int]
    SUBSCRIBE_FIELD_NUMBER: _ClassVar[int]
    UNSUBSCRIBE_FIELD_NUMBER: _ClassVar[int]
    PUBLISH_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    REFRESH_FIELD_NUMBER: _ClassVar[int]
    PING_FIELD_NUMBER: _ClassVar[int]
    PRESENCE_FIELD_NUMBER: _ClassVar[int]
    PRESENCE_STATS_FIELD_NUMBER: _ClassVar[int]
    TYPING_FIELD_NUMBER: _ClassVar[int]
    USER_STATUS_FIELD_NUMBER: _ClassVar[int]
    APP_STATE_FIELD_NUMBER: _ClassVar[int]
    REGISTER_DEVICE_FIELD_NUMBER: _ClassVar[int]
    UNREGISTER_DEVICE_FIELD_NUMBER: _ClassVar[int]
    id: int
    connect: ConnectRequest
    subscribe: SubscribeRequest
    unsubscribe: UnsubscribeRequest
    publish: PublishRequest
    history: HistoryRequest
    refresh: RefreshRequest
    ping: PingRequest
    presence: PresenceRequest
    presence_stats: PresenceStatsRequest
    typing: TypingRequest
    user_status: UserStatusRequest
    app_state: AppStateRequest
    register_device: RegisterDeviceRequest
    unregister_device: UnregisterDeviceRequest
    def __init__(self, id: _Optional[int] = ..., connect: _Optional[_Union[ConnectRequest, _Mapping]] = ..., subscribe: _Optional[_Union[SubscribeRequest, _Mapping]] = ..., unsubscribe: _Optional[_Union[UnsubscribeRequest, _Mapping]] = ..., publish: _Optional[_Union[PublishRequest, _Mapping]] = ..., history: _Optional[_Union[HistoryRequest, _Mapping]] = ..., refresh: _Optional[_Union[RefreshRequest, _Mapping]] = ..., ping: _Optional[_Union[PingRequest, _Mapping]] = ..., presence: _Optional[_Union[PresenceRequest, _Mapping]] = ..., presence_stats: _Optional[_Union[PresenceStatsRequest, _Mapping]] = ..., typing: _Optional[_Union[TypingRequest, _Mapping]] = ..., user_status: _Optional[_Union[UserStatusRequest, _Mapping]] = ..., app_state: _Optional[_Union[AppStateRequest, _Mapping]] = ..., register_device: _Optional[_Union[RegisterDeviceRequest, _Mapping]] = ..., unregister_device: _Optional[_Union[UnregisterDeviceRequest, _Mapping]] = ...) -> None: ...

class ConnectRequest(_message.Message):
    __slots__ = ("token", "name", "version", "platform")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PLATFORM_FIELD_NUMBER: _ClassVar[int]
    token: str
    name: str
    version: str
    platform: str
    def __init__(self, token: _Optional[str] = ..., name: _Optional[str] = ..., version: _Optional[str] = ..., platform: _Optional[str] = ...) -> None: ...

class SubscribeRequest(_message.Message):
    __slots__ = ("channel", "recover", "since", "delta")
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    RECOVER_FIELD_NUMBER: _ClassVar[int]
    SINCE_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    channel: str
    recover: bool
    since: StreamPosition
    delta: str
    def __init__(self, channel: _Optional[str] = ..., recover: _Optional[bool] = ..., since: _Optional[_Union[StreamPosition, _Mapping]] = ..., delta: _Optional[str] = ...) -> None: ...

class UnsubscribeRequest(_message.Message):
    __slots__ = ("channel",)
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    channel: str
    def __init__(self, channel: _Optional[str] = ...) -> None: ...

class PublishRequest(_message.Message):
    __slots__ = ("channel", "data", "idempotency_key", "tags")
    class TagsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    channel: str
    data: bytes
    idempotency_key: str
    tags: _containers.ScalarMap[str, str]
    def __init__(self, channel: _Optional[str] = ..., data: _Optional[bytes] = ..., idempotency_key: _Optional[str] = ..., tags: _Optional[_Mapping[str, str]] = ...) -> None: ...

class HistoryRequest(_message.Message):
    __slots__ = ("channel", "since", "limit", "reverse")
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    SINCE_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    REVERSE_FIELD_NUMBER: _ClassVar[int]
    channel: str
    since: StreamPosition
    limit: int
    reverse: bool
    def __init__(self, channel: _Optional[str] = ..., since: _Optional[_Union[StreamPosition, _Mapping]] = ..., limit: _Optional[int] = ..., reverse: _Optional[bool] = ...) -> None: ...

class RefreshRequest(_message.Message):
    __slots__ = ("token",)
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    token: str
    def __init__(self, token: _Optional[str] = ...) -> None: ...

class PingRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PresenceRequest(_message.Message):
    __slots__ = ("channel",)
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    channel: str
    def __init__(self, channel: _Optional[str] = ...) -> None: ...

class PresenceStatsRequest(_message.Message):
    __slots__ = ("channel",)
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    channel: str
    def __init__(self, channel: _Optional[str] = ...) -> None: ...

class TypingRequest(_message.Message):
    __slots__ = ("channel", "active")
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    channel: str
    active: bool
    def __init__(self, channel: _Optional[str] = ..., active: _Optional[bool] = ...) -> None: ...

class UserStatusRequest(_message.Message):
    __slots__ = ("users",)
    USERS_FIELD_NUMBER: _ClassVar[int]
    users: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, users: _Optional[_Iterable[str]] = ...) -> None: ...

class AppStateRequest(_message.Message):
    __slots__ = ("state", "positions")
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATE_FOREGROUND: _ClassVar[AppStateRequest.State]
        STATE_BACKGROUND: _ClassVar[AppStateRequest.State]
    STATE_FOREGROUND: AppStateRequest.State
    STATE_BACKGROUND: AppStateRequest.State
    class PositionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: StreamPosition
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[StreamPosition, _Mapping]] = ...) -> None: ...
    STATE_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    state: AppStateRequest.State
    positions: _containers.MessageMap[str, StreamPosition]
    def __init__(self, state: _Optional[_Union[AppStateRequest.State, str]] = ..., positions: _Optional[_Mapping[str, StreamPosition]] = ...) -> None: ...

class RegisterDeviceRequest(_message.Message):
    __slots__ = ("provider", "token", "environment", "app_id", "platform")
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    ENVIRONMENT_FIELD_NUMBER: _ClassVar[int]
    APP_ID_FIELD_NUMBER: _ClassVar[int]
    PLATFORM_FIELD_NUMBER: _ClassVar[int]
    provider: str
    token: str
    environment: str
    app_id: str
    platform: str
    def __init__(self, provider: _Optional[str] = ..., token: _Optional[str] = ..., environment: _Optional[str] = ..., app_id: _Optional[str] = ..., platform: _Optional[str] = ...) -> None: ...

class UnregisterDeviceRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Reply(_message.Message):
    __slots__ = ("id", "error", "connect", "subscribe", "unsubscribe", "publish", "history", "refresh", "ping", "presence", "presence_stats", "typing", "user_status", "app_state", "register_device", "unregister_device", "push")
    ID_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    CONNECT_FIELD_NUMBER: _ClassVar[int]
    SUBSCRIBE_FIELD_NUMBER: _ClassVar[int]
    UNSUBSCRIBE_FIELD_NUMBER: _ClassVar[int]
    PUBLISH_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    REFRESH_FIELD_NUMBER: _ClassVar[int]
    PING_FIELD_NUMBER: _ClassVar[int]
    PRESENCE_FIELD_NUMBER: _ClassVar[int]
    PRESENCE_STATS_FIELD_NUMBER: _ClassVar[int]
    TYPING_FIELD_NUMBER: _ClassVar[int]
    USER_STATUS_FIELD_NUMBER: _ClassVar[int]
    APP_STATE_FIELD_NUMBER: _ClassVar[int]
    REGISTER_DEVICE_FIELD_NUMBER: _ClassVar[int]
    UNREGISTER_DEVICE_FIELD_NUMBER: _ClassVar[int]
    PUSH_FIELD_NUMBER: _ClassVar[int]
    id: int
    error: Error
    connect: ConnectResult
    subscribe: SubscribeResult
    unsubscribe: UnsubscribeResult
    publish: PublishResult
    history: HistoryResult
    refresh: RefreshResult
    ping: PingResult
    presence: PresenceResult
    presence_stats: PresenceStatsResult
    typing: TypingResult
    user_status: UserStatusResult
    app_state: AppStateResult
    register_device: RegisterDeviceResult
    unregister_device: UnregisterDeviceResult
    push: Push
    def __init__(self, id: _Optional[int] = ..., error: _Optional[_Union[Error, _Mapping]] = ..., connect: _Optional[_Union[ConnectResult, _Mapping]] = ..., subscribe: _Optional[_Union[SubscribeResult, _Mapping]] = ..., unsubscribe: _Optional[_Union[UnsubscribeResult, _Mapping]] = ..., publish: _Optional[_Union[PublishResult, _Mapping]] = ..., history: _Optional[_Union[HistoryResult, _Mapping]] = ..., refresh: _Optional[_Union[RefreshResult, _Mapping]] = ..., ping: _Optional[_Union[PingResult, _Mapping]] = ..., presence: _Optional[_Union[PresenceResult, _Mapping]] = ..., presence_stats: _Optional[_Union[PresenceStatsResult, _Mapping]] = ..., typing: _Optional[_Union[TypingResult, _Mapping]] = ..., user_status: _Optional[_Union[UserStatusResult, _Mapping]] = ..., app_state: _Optional[_Union[AppStateResult, _Mapping]] = ..., register_device: _Optional[_Union[RegisterDeviceResult, _Mapping]] = ..., unregister_device: _Optional[_Union[UnregisterDeviceResult, _Mapping]] = ..., push: _Optional[_Union[Push, _Mapping]] = ...) -> None: ...

class ConnectResult(_message.Message):
    __slots__ = ("client", "version", "node", "ping_interval", "pong_timeout", "expires_in")
    CLIENT_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    PING_INTERVAL_FIELD_NUMBER: _ClassVar[int]
    PONG_TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_IN_FIELD_NUMBER: _ClassVar[int]
    client: str
    version: str
    node: str
    ping_interval: int
    pong_timeout: int
    expires_in: int
    def __init__(self, client: _Optional[str] = ..., version: _Optional[str] = ..., node: _Optional[str] = ..., ping_interval: _Optional[int] = ..., pong_timeout: _Optional[int] = ..., expires_in: _Optional[int] = ...) -> None: ...

class SubscribeResult(_message.Message):
    __slots__ = ("position", "recoverable", "recovered", "publications")
    POSITION_FIELD_NUMBER: _ClassVar[int]
    RECOVERABLE_FIELD_NUMBER: _ClassVar[int]
    RECOVERED_FIELD_NUMBER: _ClassVar[int]
    PUBLICATIONS_FIELD_NUMBER: _ClassVar[int]
    position: StreamPosition
    recoverable: bool
    recovered: bool
    publications: _containers.RepeatedCompositeFieldContainer[Publication]
    def __init__(self, position: _Optional[_Union[StreamPosition, _Mapping]] = ..., recoverable: _Optional[bool] = ..., recovered: _Optional[bool] = ..., publications: _Optional[_Iterable[_Union[Publication, _Mapping]]] = ...) -> None: ...

class UnsubscribeResult(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PublishResult(_message.Message):
    __slots__ = ("position", "duplicate")
    POSITION_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    position: StreamPosition
    duplicate: bool
    def __init__(self, position: _Optional[_Union[StreamPosition, _Mapping]] = ..., duplicate: _Optional[bool] = ...) -> None: ...

class HistoryResult(_message.Message):
    __slots__ = ("publications", "position")
    PUBLICATIONS_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    publications: _containers.RepeatedCompositeFieldContainer[Publication]
    position: StreamPosition
    def __init__(self, publications: _Optional[_Iterable[_Union[Publication, _Mapping]]] = ..., position: _Optional[_Union[StreamPosition, _Mapping]] = ...) -> None: ...

class RefreshResult(_message.Message):
    __slots__ = ("expires_in",)
    EXPIRES_IN_FIELD_NUMBER: _ClassVar[int]
    expires_in: int
    def __init__(self, expires_in: _Optional[int] = ...) -> None: ...

class PingResult(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PresenceResult(_message.Message):
    __slots__ = ("clients",)
    class ClientsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: ClientInfo
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[ClientInfo, _Mapping]] = ...) -> None: ...
    CLIENTS_FIELD_NUMBER: _ClassVar[int]
    clients: _containers.MessageMap[str, ClientInfo]
    def __init__(self, clients: _Optional[_Mapping[str, ClientInfo]] = ...) -> None: ...

class PresenceStatsResult(_message.Message):
    __slots__ = ("clients", "users")
    CLIENTS_FIELD_NUMBER: _ClassVar[int]
    USERS_FIELD_NUMBER: _ClassVar[int]
    clients: int
    users: int
    def __init__(self, clients: _Optional[int] = ..., users: _Optional[int] = ...) -> None: ...

class TypingResult(_message.Message):
    __slots__ = ("throttled",)
    THROTTLED_FIELD_NUMBER: _ClassVar[int]
    throttled: bool
    def __init__(self, throttled: _Optional[bool] = ...) -> None: ...

class UserStatusResult(_message.Message):
    __slots__ = ("statuses",)
    STATUSES_FIELD_NUMBER: _ClassVar[int]
    statuses: _containers.RepeatedCompositeFieldContainer[UserStatus]
    def __init__(self, statuses: _Optional[_Iterable[_Union[UserStatus, _Mapping]]] = ...) -> None: ...

class AppStateResult(_message.Message):
    __slots__ = ("positions", "detach_ttl")
    class PositionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: StreamPosition
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[StreamPosition, _Mapping]] = ...) -> None: ...
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    DETACH_TTL_FIELD_NUMBER: _ClassVar[int]
    positions: _containers.MessageMap[str, StreamPosition]
    detach_ttl: int
    def __init__(self, positions: _Optional[_Mapping[str, StreamPosition]] = ..., detach_ttl: _Optional[int] = ...) -> None: ...

class RegisterDeviceResult(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class UnregisterDeviceResult(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class UserStatus(_message.Message):
    __slots__ = ("user", "online", "last_seen")
    USER_FIELD_NUMBER: _ClassVar[int]
    ONLINE_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_FIELD_NUMBER: _ClassVar[int]
    user: str
    online: bool
    last_seen: int
    def __init__(self, user: _Optional[str] = ..., online: _Optional[bool] = ..., last_seen: _Optional[int] = ...) -> None: ...

class Push(_message.Message):
    __slots__ = ("channel", "pub", "unsubscribe", "disconnect", "ping", "join", "leave", "typing")
    CHANNEL_FIELD_NUMBER: _ClassVar[int]
    PUB_FIELD_NUMBER: _ClassVar[int]
    UNSUBSCRIBE_FIELD_NUMBER: _ClassVar[int]
    DISCONNECT_FIELD_NUMBER: _ClassVar[int]
    PING_FIELD_NUMBER: _ClassVar[int]
    JOIN_FIELD_NUMBER: _ClassVar[int]
    LEAVE_FIELD_NUMBER: _ClassVar[int]
    TYPING_FIELD_NUMBER: _ClassVar[int]
    channel: str
    pub: Publication
    unsubscribe: Unsubscribed
    disconnect: Disconnect
    ping: ServerPing
    join: ClientInfo
    leave: ClientInfo
    typing: Typing
    def __init__(self, channel: _Optional[str] = ..., pub: _Optional[_Union[Publication, _Mapping]] = ..., unsubscribe: _Optional[_Union[Unsubscribed, _Mapping]] = ..., disconnect: _Optional[_Union[Disconnect, _Mapping]] = ..., ping: _Optional[_Union[ServerPing, _Mapping]] = ..., join: _Optional[_Union[ClientInfo, _Mapping]] = ..., leave: _Optional[_Union[ClientInfo, _Mapping]] = ..., typing: _Optional[_Union[Typing, _Mapping]] = ...) -> None: ...

class Typing(_message.Message):
    __slots__ = ("user", "client", "active")
    USER_FIELD_NUMBER: _ClassVar[int]
    CLIENT_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    user: str
    client: str
    active: bool
    def __init__(self, user: _Optional[str] = ..., client: _Optional[str] = ..., active: _Optional[bool] = ...) -> None: ...

class Publication(_message.Message):
    __slots__ = ("offset", "data", "info", "tags", "delta")
    class TagsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    INFO_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    offset: int
    data: bytes
    info: ClientInfo
    tags: _containers.ScalarMap[str, str]
    delta: bool
    def __init__(self, offset: _Optional[int] = ..., data: _Optional[bytes] = ..., info: _Optional[_Union[ClientInfo, _Mapping]] = ..., tags: _Optional[_Mapping[str, str]] = ..., delta: _Optional[bool] = ...) -> None: ...

class ClientInfo(_message.Message):
    __slots__ = ("user", "client", "device", "info", "transport")
    USER_FIELD_NUMBER: _ClassVar[int]
    CLIENT_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    INFO_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    user: str
    client: str
    device: str
    info: bytes
    transport: str
    def __init__(self, user: _Optional[str] = ..., client: _Optional[str] = ..., device: _Optional[str] = ..., info: _Optional[bytes] = ..., transport: _Optional[str] = ...) -> None: ...

class StreamPosition(_message.Message):
    __slots__ = ("offset", "epoch")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    offset: int
    epoch: str
    def __init__(self, offset: _Optional[int] = ..., epoch: _Optional[str] = ...) -> None: ...

class Unsubscribed(_message.Message):
    __slots__ = ("code", "reason")
    CODE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    code: int
    reason: str
    def __init__(self, code: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class Disconnect(_message.Message):
    __slots__ = ("code", "reason", "reconnect", "reconnect_after_ms")
    CODE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    RECONNECT_FIELD_NUMBER: _ClassVar[int]
    RECONNECT_AFTER_MS_FIELD_NUMBER: _ClassVar[int]
    code: int
    reason: str
    reconnect: bool
    reconnect_after_ms: int
    def __init__(self, code: _Optional[int] = ..., reason: _Optional[str] = ..., reconnect: _Optional[bool] = ..., reconnect_after_ms: _Optional[int] = ...) -> None: ...

class ServerPing(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "message", "temporary", "retry_after_ms", "action")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    TEMPORARY_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_MS_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    temporary: bool
    retry_after_ms: int
    action: Action
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ..., temporary: _Optional[bool] = ..., retry_after_ms: _Optional[int] = ..., action: _Optional[_Union[Action, str]] = ...) -> None: ...
