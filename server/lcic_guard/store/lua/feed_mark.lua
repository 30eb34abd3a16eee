-- KEYS[1] feed shard stream, KEYS[2] its sequence. ARGV: feed maxlen.
-- A progress mark: "the shard's last change is number N", written by the
-- reconciler every second even when nothing changes. A reader that has
-- applied N is current as of the mark (its stream id is Redis's clock); one
-- that has applied less missed something.
return feed_append(KEYS[1], KEYS[2], ARGV[1], false, {'m', '1'})
