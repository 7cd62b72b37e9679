-- Running totals of the log and the quarantine, kept by the recorder in the same transaction
-- as each append, so /metrics never has to count(*) a log of millions of rows.
CREATE TABLE ledger.log_counts (
    id           boolean PRIMARY KEY DEFAULT true CHECK (id),
    events       bigint  NOT NULL,
    quarantined  bigint  NOT NULL
);

INSERT INTO ledger.log_counts (events, quarantined)
SELECT (SELECT count(*) FROM ledger.events), (SELECT count(*) FROM ledger.quarantine);
