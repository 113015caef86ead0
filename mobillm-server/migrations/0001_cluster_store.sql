-- The cluster store's tables (mobillm-server/src/store/cluster.rs). A session's record is its JSON; the columns
-- beside it are what queries select on, written from the record in the same statement.

CREATE TABLE sessions (
    id            text PRIMARY KEY,
    key_hash      text NOT NULL,
    record        text NOT NULL,
    -- a job queued or running: the training queue is the set of these rows
    job_active    boolean NOT NULL DEFAULT false,
    -- unix second the current worker's lease ends (0: no worker holds the job)
    lease_until   bigint NOT NULL DEFAULT 0,
    -- order of arrival in the queue (from `turns`)
    queued_turn   bigint NOT NULL DEFAULT 0,
    -- object holding the latest checkpoint, and its size
    weights_key   text,
    weights_bytes bigint NOT NULL DEFAULT 0
);
CREATE INDEX sessions_queue ON sessions (lease_until) WHERE job_active;

-- One row per cached sample; its activations are row `row_index` of the object `chunk`.
CREATE TABLE samples (
    session_id text NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    sample_id  bytea NOT NULL,
    chunk      text NOT NULL,
    row_index  integer NOT NULL,
    target     bytea NOT NULL,
    PRIMARY KEY (session_id, sample_id)
);

-- Per API key: sessions and stored bytes (quotas), and when the key's jobs were last served (fairness).
CREATE TABLE api_keys (
    key_hash    text PRIMARY KEY,
    sessions    bigint NOT NULL DEFAULT 0,
    bytes       bigint NOT NULL DEFAULT 0,
    served_turn bigint NOT NULL DEFAULT 0
);

-- The whole store's sessions and bytes (one row).
CREATE TABLE usage (
    id       smallint PRIMARY KEY CHECK (id = 1),
    sessions bigint NOT NULL,
    bytes    bigint NOT NULL
);
INSERT INTO usage VALUES (1, 0, 0);

-- Hash of (API key hash, idempotency key) of a create request → its session.
CREATE TABLE idempotency (
    key        text PRIMARY KEY,
    session_id text NOT NULL REFERENCES sessions (id) ON DELETE CASCADE
);

CREATE SEQUENCE turns;
