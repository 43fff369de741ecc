-- Subclouds: private environments with members, models at their own prices,
-- and node-eligibility rules. Accounts live in the account layer (possibly
-- another database), so account ids are plain uuids here, not foreign keys.
CREATE TABLE subclouds (
    subcloud_id          uuid PRIMARY KEY,
    name                 text NOT NULL,
    owner_account_id     uuid NOT NULL,
    created_at           timestamptz NOT NULL DEFAULT now(),
    archived_at          timestamptz,
    operator_account_ids text[] NOT NULL DEFAULT '{}',
    regions              text[] NOT NULL DEFAULT '{}',
    min_reputation       double precision NOT NULL DEFAULT 0
                         CHECK (min_reputation BETWEEN 0 AND 1),
    verified_only        boolean NOT NULL DEFAULT false
);

CREATE TABLE subcloud_members (
    subcloud_id uuid NOT NULL REFERENCES subclouds ON DELETE CASCADE,
    account_id  uuid NOT NULL,
    role        text NOT NULL CHECK (role IN ('member', 'admin', 'owner')),
    added_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (subcloud_id, account_id)
);
-- "Which subclouds is this account in", for listing.
CREATE INDEX subcloud_members_by_account ON subcloud_members (account_id, subcloud_id);

-- A NULL price means the catalog's price for the model.
CREATE TABLE subcloud_models (
    subcloud_id      uuid NOT NULL REFERENCES subclouds ON DELETE CASCADE,
    model            text NOT NULL,
    prompt_price     bigint CHECK (prompt_price >= 0),
    completion_price bigint CHECK (completion_price >= 0),
    PRIMARY KEY (subcloud_id, model),
    CHECK ((prompt_price IS NULL) = (completion_price IS NULL))
);
