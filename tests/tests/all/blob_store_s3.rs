//! The S3-compatible blob store against a real S3 server on loopback (moto, see
//! tests/support/s3.rs): what the folder store promises — content addressing, ranges,
//! listing, deletion, refused hashes — plus presigned GETs a client can follow.

use bytes::Bytes;
use flowhost::jobs::blobs::{BlobError, BlobStore, FsBlobStore, hash_of};
use flowhost::jobs::blobs_s3::{S3BlobStore, S3Location, S3Options};
use flowhost_tests::s3::S3Server;

async fn bucket_store(server: &S3Server, prefix: &str, options: S3Options) -> S3BlobStore {
    let location = S3Location::parse(&server.blob_store_url(prefix)).unwrap();
    S3BlobStore::from_vars(&location, &options, &server.aws_vars()).unwrap()
}

#[tokio::test]
async fn the_same_bytes_are_stored_once_and_read_back_by_range_from_the_bucket() {
    let server = S3Server::start("flowhost-blobs").await.expect("moto starts");
    let store = bucket_store(&server, "prod/outputs", S3Options::default()).await;
    let (hash, new) = store.put(Bytes::from_static(b"hello world")).await.unwrap();
    assert!(new);
    assert_eq!(hash, hash_of(b"hello world"));
    let (again, new) = store.put(Bytes::from_static(b"hello world")).await.unwrap();
    assert_eq!((again.as_str(), new), (hash.as_str(), false), "content-addressed: stored once");
    assert!(store.exists(&hash).await.unwrap());
    assert_eq!(&store.get(&hash).await.unwrap()[..], b"hello world");
    assert_eq!(&store.get_range(&hash, 6, 100).await.unwrap()[..], b"world", "a range past the end is clamped");
    assert_eq!(&store.get_range(&hash, 0, 5).await.unwrap()[..], b"hello");
    assert_eq!(store.list().await.unwrap().into_iter().map(|(h, _)| h).collect::<Vec<_>>(), vec![hash.clone()]);
    // A second instance (another client, same bucket and prefix) sees the same blob.
    let other = bucket_store(&server, "prod/outputs", S3Options::default()).await;
    assert_eq!(&other.get(&hash).await.unwrap()[..], b"hello world");
    // Another prefix is another store.
    let elsewhere = bucket_store(&server, "staging", S3Options::default()).await;
    assert!(!elsewhere.exists(&hash).await.unwrap());
    assert!(elsewhere.list().await.unwrap().is_empty());
    assert!(store.delete(&hash).await.unwrap());
    assert!(!store.delete(&hash).await.unwrap(), "already gone");
    assert!(matches!(store.get(&hash).await, Err(BlobError::NotFound(_))));
}

#[tokio::test]
async fn a_hash_that_is_not_one_never_names_an_object() {
    let server = S3Server::start("flowhost-blobs").await.expect("moto starts");
    let store = bucket_store(&server, "", S3Options::default()).await;
    for bad in ["blake3:../../etc/passwd", "../x", "blake3:ZZ", "sha256:abcd"] {
        assert!(matches!(store.get(bad).await, Err(BlobError::BadHash(_))), "{bad}");
        assert!(matches!(store.presigned_get(bad).await, Err(BlobError::BadHash(_))), "{bad}");
    }
}

#[tokio::test]
async fn a_presigned_url_serves_the_blob_and_its_ranges_without_credentials() {
    let server = S3Server::start("flowhost-blobs").await.expect("moto starts");
    let store = bucket_store(&server, "p", S3Options { presign_for: Some(std::time::Duration::from_secs(60)), ..Default::default() }).await;
    let (hash, _) = store.put(Bytes::from_static(b"0123456789")).await.unwrap();
    let url = store.presigned_get(&hash).await.unwrap().expect("presigning is on");
    assert!(url.contains("X-Amz-Signature="), "a SigV4 presigned URL: {url}");
    let client = reqwest::Client::new();
    let whole = client.get(&url).send().await.unwrap();
    assert_eq!(whole.status(), 200);
    assert_eq!(&whole.bytes().await.unwrap()[..], b"0123456789");
    let part = client.get(&url).header("range", "bytes=2-4").send().await.unwrap();
    assert_eq!(part.status(), 206);
    assert_eq!(&part.bytes().await.unwrap()[..], b"234");
    // Without presigning the store answers None (stream through), like the folder store.
    let plain = bucket_store(&server, "p", S3Options::default()).await;
    assert_eq!(plain.presigned_get(&hash).await.unwrap(), None);
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(FsBlobStore::new(dir.path()).unwrap().presigned_get(&hash).await.unwrap(), None);
}

#[tokio::test]
async fn a_bucket_error_names_no_endpoint_or_credentials() {
    let server = S3Server::start("flowhost-blobs").await.expect("moto starts");
    let location = S3Location::parse(&server.blob_store_url("x")).unwrap();
    // A bucket that does not exist: the error says what failed, not where.
    let missing = S3Location { bucket: "no-such-bucket".into(), ..location };
    let store = S3BlobStore::from_vars(&missing, &S3Options::default(), &server.aws_vars()).unwrap();
    let err = store.put(Bytes::from_static(b"x")).await.unwrap_err().to_string();
    assert!(!err.contains("127.0.0.1") && !err.contains(&server.port.to_string()) && !err.contains("testing"), "{err}");
}
