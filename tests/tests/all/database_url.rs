//! Reaching PostgreSQL (issue #22): over TLS as every managed server requires
//! (`sslmode=require`, and `verify-full` against the server's CA with `sslrootcert=`),
//! against a throw-away cluster with a certificate made for the test; and a bad
//! `--database-url` (refused, wrong scheme, junk, a certificate nobody vouches for)
//! reported at once with the host and the cause — before, sqlx was built without TLS
//! ("TLS failed") and every connect error was "timed out" after the pool's 10 s.

use std::time::Instant;

use flowhost::jobs::PostgresStore;
use flowhost_tests::pg::PgCluster;

/// Whether the store's own connections are encrypted (the server's view).
async fn over_tls(store: &PostgresStore) -> bool {
    sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetch_one(&store.pool()).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_connects_over_tls_with_sslmode_require_and_verify_full() {
    let cluster = PgCluster::start_tls().await.expect("a PostgreSQL test cluster with TLS starts");
    let url = cluster.fresh_database().await.unwrap();
    let ca = cluster.ca_file.clone().unwrap();

    let store = PostgresStore::open(&format!("{url}?sslmode=require")).await.expect("sslmode=require connects");
    assert!(over_tls(&store).await, "sslmode=require is encrypted");
    let verified = PostgresStore::open(&format!("{url}?sslmode=verify-full&sslrootcert={}", ca.display())).await.expect("verify-full against the CA connects");
    assert!(over_tls(&verified).await, "verify-full is encrypted");

    // The same server, its certificate checked against the system's roots only: refused,
    // and the error says where and why.
    let started = Instant::now();
    let unknown = PostgresStore::open(&format!("{url}?sslmode=verify-full")).await.err().expect("an unknown CA is refused");
    let message = unknown.to_string();
    assert!(message.contains(&format!("127.0.0.1:{}", cluster.port)) && message.contains("TLS"), "{message}");
    assert!(!message.contains("timed out"), "{message}");
    eprintln!("unknown CA: {message} ({:?})", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_database_url_fails_at_once_naming_the_host_and_the_cause() {
    let port = flowhost_tests::free_port();
    let refused = format!("postgres://flowhost:s3cret@127.0.0.1:{port}/jobs");
    let cases: [(&str, &str, &[&str]); 4] = [
        ("refused", &refused, &[&format!("127.0.0.1:{port}"), "cannot be reached", "refused"]),
        ("wrong scheme", "mysql://flowhost:s3cret@127.0.0.1/jobs", &["must start with postgres://"]),
        ("junk", "postgres://flowhost:s3cret@127.0.0.1:notaport/jobs", &["not usable"]),
        ("bad sslmode", "postgres://flowhost:s3cret@127.0.0.1/jobs?sslmode=sometimes", &["not usable", "ssl_mode"]),
    ];
    for (what, url, wanted) in cases {
        let started = Instant::now();
        let error = PostgresStore::open(url).await.err().unwrap_or_else(|| panic!("{what}: opened"));
        let elapsed = started.elapsed();
        let message = error.to_string();
        eprintln!("{what}: {message} ({elapsed:?})");
        for part in wanted {
            assert!(message.contains(part), "{what}: `{message}` does not say `{part}`");
        }
        assert!(!message.contains("timed out"), "{what}: {message}");
        assert!(!message.contains("s3cret"), "{what}: the password leaked: {message}");
    }
}
