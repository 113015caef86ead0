//! The assist server against hostile clients, on the real binary over 127.0.0.1: every attack of the
//! hostile-client review (the rows of the table in docs/server.md, "Hostile clients", noted per test) is refused
//! or bounded, the server keeps answering, and stored data stays intact. What the tests assert is behaviour
//! (status codes, counts, bytes on disk, resident memory from `/proc` within a bound), never speed.

mod hostile {
    mod support;

    mod client;
    mod connections;
    mod jobs;
    mod memory;
    mod observability;
    mod sessions;
    mod sizes;
}
