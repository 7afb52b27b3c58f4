"""Push providers: wake a backgrounded app through APNs (aioapns) or FCM (firebase-admin).

`messages` holds the values (`Wake`, what to send to one device; `PushOutcome`, what the
provider answered), `apns` and `fcm` the providers, `breaker` a pure circuit breaker and
`sender` the `PushSender` that queues wakes, retries temporary errors with backoff and
reports invalid tokens. Nothing here knows channels or sessions: the wake policy builds
`Wake`s and hands them to the sender.
"""
