-- The DS's tables on PostgreSQL (docs/ARCHITECTURE.md, "Scaling out").
-- Unsigned 64-bit values are stored in bigint: times and counters are far
-- below 2^63; a send id's random nonce keeps its 64 bits, reinterpreted as
-- signed.

CREATE TABLE clients (
    id               bytea PRIMARY KEY,
    signature_scheme integer NOT NULL,
    signature_key    bytea NOT NULL,
    registered_ms    bigint NOT NULL,
    deleted_ms       bigint,
    recovery_hash    bytea
);

-- One row per registered client: its queue's head and acknowledgement
-- mark. Every write that queues for, acknowledges or closes a queue locks
-- this row, so sequence numbers are assigned in commit order, gap-free.
CREATE TABLE queues (
    client bytea PRIMARY KEY,
    head   bigint NOT NULL DEFAULT 0,
    acked  bigint NOT NULL DEFAULT 0,
    closed boolean NOT NULL DEFAULT false
);

CREATE TABLE key_packages (
    owner     bytea NOT NULL,
    kp_ref    bytea NOT NULL,
    message   bytea NOT NULL,
    not_after bigint NOT NULL,
    claims    bigint NOT NULL,
    PRIMARY KEY (owner, kp_ref)
);
CREATE INDEX key_packages_not_after ON key_packages (not_after);

CREATE TABLE last_resorts (
    owner     bytea PRIMARY KEY,
    kp_ref    bytea NOT NULL,
    message   bytea NOT NULL,
    not_after bigint NOT NULL,
    claims    bigint NOT NULL
);

CREATE TABLE key_package_owners (
    kp_ref bytea PRIMARY KEY,
    owner  bytea NOT NULL
);

CREATE TABLE groups (
    id         bytea PRIMARY KEY,
    epoch      bigint NOT NULL,
    revision   bigint NOT NULL,
    open       boolean NOT NULL,
    members    bytea[] NOT NULL,
    creator    bytea NOT NULL,
    created_ms bigint NOT NULL
);

-- The GroupInfo and the DS's PublicGroup: each entity the MessagePack
-- encoding of the OpenMLS value.
CREATE TABLE group_states (
    id                      bytea PRIMARY KEY REFERENCES groups (id) ON DELETE CASCADE,
    group_info              bytea NOT NULL,
    tree                    bytea,
    context                 bytea,
    interim_transcript_hash bytea,
    confirmation_tag        bytea,
    proposal_refs           bytea[] NOT NULL,
    proposals               bytea[] NOT NULL
);

CREATE TABLE commits (
    group_id    bytea NOT NULL REFERENCES groups (id) ON DELETE CASCADE,
    epoch       bigint NOT NULL,
    commit_hash bytea NOT NULL,
    committer   bytea NOT NULL,
    new_epoch   bigint NOT NULL,
    recipients  integer NOT NULL,
    accepted_ms bigint NOT NULL,
    PRIMARY KEY (group_id, epoch)
);
CREATE INDEX commits_accepted ON commits (accepted_ms);

CREATE TABLE invites (
    code       text PRIMARY KEY,
    uses_left  integer NOT NULL,
    expires_ms bigint,
    created_ms bigint NOT NULL
);

CREATE TABLE usage (
    client         bytea PRIMARY KEY,
    groups_created integer NOT NULL
);

-- A message is stored once; queue_entries refer to it per recipient. A
-- message no entry refers to any more is deleted by the backend's sweep.
CREATE TABLE messages (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind            smallint NOT NULL,
    group_id        bytea NOT NULL,
    epoch           bigint NOT NULL,
    sender          bytea NOT NULL,
    message         bytea NOT NULL,
    stored_ms       bigint NOT NULL,
    send_created_ms bigint,
    send_nonce      bigint,
    ratchet_tree    bytea NOT NULL
);
CREATE INDEX messages_stored ON messages (stored_ms);

CREATE TABLE queue_entries (
    client     bytea NOT NULL,
    seq        bigint NOT NULL,
    message_id bigint NOT NULL,
    PRIMARY KEY (client, seq)
);
CREATE INDEX queue_entries_message ON queue_entries (message_id);

CREATE TABLE send_receipts (
    sender     bytea NOT NULL,
    created_ms bigint NOT NULL,
    nonce      bigint NOT NULL,
    message_id bigint NOT NULL,
    recipients integer NOT NULL,
    PRIMARY KEY (sender, created_ms, nonce)
);
CREATE INDEX send_receipts_created ON send_receipts (created_ms);

-- Sessions, so that one opened on any node is valid on every node (each
-- node keeps its own replay window per session). Deleting or recovering a
-- client deletes its sessions in the same transaction.
CREATE TABLE sessions (
    id         bytea PRIMARY KEY,
    client     bytea NOT NULL,
    key        bytea NOT NULL,
    expires_ms bigint NOT NULL
);
CREATE INDEX sessions_client ON sessions (client);
CREATE INDEX sessions_expires ON sessions (expires_ms);
