-- The node holding a roll-up partition's lease, so that a node restarted after kill -9
-- hands its half-closed partitions back at once (Store::release_node_claims) instead of
-- leaving them until the lease runs out.
ALTER TABLE rollup_partitions ADD COLUMN lease_node TEXT;
