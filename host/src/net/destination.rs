//! Where flowhost may open an outbound connection: the SSRF policy, shared by webhook
//! deliveries and by fetches of models and images named by URL. Checked when a URL is
//! submitted, again after DNS resolution on every connection, and again on every redirect.
//!
//! Owns: the URL rules and the address classification, the vetting DNS resolver.
//! Must never: let a connection reach an address it did not vet (clients resolve names
//! only through [`VettingResolver`], which hands the connector nothing but vetted
//! addresses, so the connection is pinned to what was vetted; and they have no proxy that
//! would resolve names on its own), or tell a caller which internal address a name
//! resolved to.
//!
//! The rule: if the operator lists hosts (`--webhook-allow-host` for webhooks,
//! `--fetch-allow-host` for fetches), destinations are limited to those hosts (http or
//! https, any address: the operator vouches for them, which is how a loopback receiver or
//! file server is allowed). Otherwise only `https` to public addresses: loopback,
//! private (RFC 1918), shared/CGNAT (100.64/10), link-local (169.254/16 with the cloud
//! metadata address, fe80::/10), unique-local (fc00::/7), unspecified, multicast, broadcast,
//! documentation, benchmarking and reserved ranges, and IPv6 forms that embed such an IPv4
//! address (IPv4-mapped, NAT64, 6to4), are refused.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use url::{Host, Url};

/// Longest URL accepted (bytes).
pub const MAX_URL_BYTES: usize = 2048;

/// How long the submission-time check waits for DNS before accepting the URL and leaving
/// the verdict to delivery time (which vets again anyway).
const SUBMISSION_DNS_TIMEOUT: Duration = Duration::from_secs(2);

/// Why a destination was refused. Messages are safe to show to the caller: they name the
/// rule, never a resolved address.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum DestinationError {
    #[error("the URL is longer than {MAX_URL_BYTES} bytes")]
    TooLong,
    #[error("the URL is not an absolute URL")]
    NotAUrl,
    #[error("the URL must use https")]
    NotHttps,
    #[error("the URL must not carry a user name or password")]
    Credentials,
    #[error("the URL has no host")]
    NoHost,
    #[error("the host `{0}` is not on this server's allow-list")]
    NotAllowListed(String),
    #[error("the URL points to a {0} address; only public addresses are allowed")]
    ForbiddenAddress(&'static str),
    #[error("the host resolves to a {0} address; only public addresses are allowed")]
    ResolvesToForbidden(&'static str),
    #[error("the host could not be resolved")]
    Unresolvable,
}

/// The operator's destination policy. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct DestinationPolicy {
    /// Lower-cased host names or IP literals; empty = public https only.
    allow_hosts: Arc<[String]>,
}

impl DestinationPolicy {
    /// `allow_hosts` are host names or IP literals (no scheme, no port), matched exactly,
    /// case-insensitively. IPv6 literals may be given with or without brackets.
    pub fn new(allow_hosts: impl IntoIterator<Item = String>) -> Self {
        let hosts: Vec<String> = allow_hosts
            .into_iter()
            .map(|host| host.trim().trim_start_matches('[').trim_end_matches(']').to_ascii_lowercase())
            .filter(|host| !host.is_empty())
            .collect();
        Self { allow_hosts: hosts.into() }
    }

    /// Whether the operator limited destinations to a list.
    pub fn has_allow_list(&self) -> bool {
        !self.allow_hosts.is_empty()
    }

    fn is_allow_listed(&self, host: &str) -> bool {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        self.allow_hosts.iter().any(|allowed| allowed.eq_ignore_ascii_case(host))
    }

    /// The rules that need no DNS: length, syntax, scheme, credentials, allow-list, and
    /// the address of an IP literal. Used for every hop, at submission and on redirects.
    pub fn check_url(&self, text: &str) -> Result<Url, DestinationError> {
        if text.len() > MAX_URL_BYTES {
            return Err(DestinationError::TooLong);
        }
        let url = Url::parse(text).map_err(|_| DestinationError::NotAUrl)?;
        self.check_parsed(&url)?;
        Ok(url)
    }

    /// [`check_url`](Self::check_url) for a URL already parsed (a redirect's target).
    pub fn check_parsed(&self, url: &Url) -> Result<(), DestinationError> {
        if url.as_str().len() > MAX_URL_BYTES {
            return Err(DestinationError::TooLong);
        }
        if !matches!(url.scheme(), "http" | "https") {
            return Err(if self.has_allow_list() { DestinationError::NotAUrl } else { DestinationError::NotHttps });
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(DestinationError::Credentials);
        }
        let host = url.host().ok_or(DestinationError::NoHost)?;
        let host_text = url.host_str().ok_or(DestinationError::NoHost)?;
        if self.has_allow_list() {
            if self.is_allow_listed(host_text) {
                return Ok(());
            }
            // An internal IP literal off the list is refused for what it is (a redirect to
            // a private address says so), any other host for not being listed.
            let literal = match host {
                Host::Ipv4(ip) => forbidden_reason(IpAddr::V4(ip)),
                Host::Ipv6(ip) => forbidden_reason(IpAddr::V6(ip)),
                Host::Domain(_) => None,
            };
            return Err(literal.map_or_else(|| DestinationError::NotAllowListed(host_text.to_owned()), DestinationError::ForbiddenAddress));
        }
        if url.scheme() != "https" {
            return Err(DestinationError::NotHttps);
        }
        match host {
            Host::Ipv4(ip) => forbidden_reason(IpAddr::V4(ip)).map_or(Ok(()), |why| Err(DestinationError::ForbiddenAddress(why))),
            Host::Ipv6(ip) => forbidden_reason(IpAddr::V6(ip)).map_or(Ok(()), |why| Err(DestinationError::ForbiddenAddress(why))),
            Host::Domain(name) => {
                let name = name.trim_end_matches('.');
                if name.eq_ignore_ascii_case("localhost") || name.to_ascii_lowercase().ends_with(".localhost") {
                    Err(DestinationError::ForbiddenAddress("loopback"))
                } else {
                    Ok(())
                }
            }
        }
    }

    /// The submission-time check: [`check_url`](Self::check_url), then, for a name that
    /// is not allow-listed, a DNS lookup (bounded) refusing names that resolve to a
    /// forbidden address. A lookup that fails or times out does not refuse: delivery vets
    /// every connection again.
    pub async fn vet_for_submission(&self, text: &str) -> Result<Url, DestinationError> {
        let url = self.check_url(text)?;
        if self.has_allow_list() {
            return Ok(url);
        }
        if let Some(Host::Domain(name)) = url.host() {
            let port = url.port_or_known_default().unwrap_or(443);
            let lookup = tokio::net::lookup_host((name.to_owned(), port));
            if let Ok(Ok(addresses)) = tokio::time::timeout(SUBMISSION_DNS_TIMEOUT, lookup).await {
                check_resolved(addresses)?;
            }
        }
        Ok(url)
    }
}

/// Refuse a resolution when *any* of its addresses is forbidden (a name that mixes public
/// and internal addresses is a rebinding trick, not a real service), and an empty one.
fn check_resolved(addresses: impl Iterator<Item = SocketAddr>) -> Result<Vec<SocketAddr>, DestinationError> {
    let addresses: Vec<SocketAddr> = addresses.collect();
    if addresses.is_empty() {
        return Err(DestinationError::Unresolvable);
    }
    for address in &addresses {
        if let Some(why) = forbidden_reason(address.ip()) {
            return Err(DestinationError::ResolvesToForbidden(why));
        }
    }
    Ok(addresses)
}

/// Why `ip` must not be a destination, or `None` for a public address.
pub fn forbidden_reason(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => forbidden_v4(v4),
        IpAddr::V6(v6) => forbidden_v6(v6),
    }
}

fn in_v4(ip: Ipv4Addr, net: [u8; 4], prefix: u32) -> bool {
    let mask = if prefix == 0 { 0 } else { u32::MAX << (32 - prefix) };
    (u32::from(ip) & mask) == (u32::from(Ipv4Addr::from(net)) & mask)
}

fn forbidden_v4(ip: Ipv4Addr) -> Option<&'static str> {
    const RANGES: &[([u8; 4], u32, &str)] = &[
        ([0, 0, 0, 0], 8, "unspecified"),
        ([127, 0, 0, 0], 8, "loopback"),
        ([10, 0, 0, 0], 8, "private"),
        ([172, 16, 0, 0], 12, "private"),
        ([192, 168, 0, 0], 16, "private"),
        ([100, 64, 0, 0], 10, "shared (CGNAT)"),
        ([169, 254, 0, 0], 16, "link-local (cloud metadata)"),
        ([192, 0, 0, 0], 24, "reserved"),
        ([192, 0, 2, 0], 24, "documentation"),
        ([198, 51, 100, 0], 24, "documentation"),
        ([203, 0, 113, 0], 24, "documentation"),
        ([192, 88, 99, 0], 24, "reserved"),
        ([198, 18, 0, 0], 15, "benchmarking"),
        ([224, 0, 0, 0], 4, "multicast"),
        ([240, 0, 0, 0], 4, "reserved"),
    ];
    RANGES.iter().find(|(net, prefix, _)| in_v4(ip, *net, *prefix)).map(|(_, _, why)| *why)
}

fn forbidden_v6(ip: Ipv6Addr) -> Option<&'static str> {
    let segments = ip.segments();
    let bits = u128::from(ip);
    let in_v6 = |net: u128, prefix: u32| (bits >> (128 - prefix)) == (net >> (128 - prefix));
    if ip.is_unspecified() {
        return Some("unspecified");
    }
    if ip.is_loopback() {
        return Some("loopback");
    }
    // IPv4-mapped (::ffff:a.b.c.d) and NAT64 (64:ff9b::a.b.c.d) reach the embedded address.
    if in_v6(0xffff_0000_0000, 96) || in_v6(0x0064_ff9b_0000_0000_0000_0000_0000_0000, 96) {
        let embedded = Ipv4Addr::from((bits & 0xffff_ffff) as u32);
        return forbidden_v4(embedded);
    }
    // 6to4 (2002:a.b.c.d::/48) embeds an IPv4 address in bits 16..48.
    if segments[0] == 0x2002 {
        let embedded = Ipv4Addr::from(((u32::from(segments[1])) << 16) | u32::from(segments[2]));
        return forbidden_v4(embedded);
    }
    if in_v6(0xfc00 << 112, 7) {
        return Some("unique-local");
    }
    if in_v6(0xfe80 << 112, 10) {
        return Some("link-local");
    }
    if in_v6(0xff00 << 112, 8) {
        return Some("multicast");
    }
    if in_v6(0x2001_0db8 << 96, 32) || in_v6(0x3fff << 112, 20) {
        return Some("documentation");
    }
    // 2001::/23: IETF protocol assignments (Teredo, benchmarking, ORCHID, ...).
    if in_v6(0x2001 << 112, 23) {
        return Some("reserved");
    }
    // Only global unicast (2000::/3) is public; the rest (deprecated IPv4-compatible
    // ::a.b.c.d, discard-only 100::/64, site-local, ...) is not.
    if !in_v6(0x2000 << 112, 3) {
        return Some("reserved");
    }
    None
}

/// The DNS resolver of every outbound client (webhook delivery, fetches): names not on the allow-list resolve only to vetted
/// addresses, and a name with any forbidden address fails to resolve, so the connector
/// never dials one. IP literals never reach a resolver; [`DestinationPolicy::check_url`]
/// vets them before every request.
#[derive(Debug, Clone)]
pub struct VettingResolver {
    policy: DestinationPolicy,
}

impl VettingResolver {
    pub fn new(policy: DestinationPolicy) -> Self {
        Self { policy }
    }
}

impl reqwest::dns::Resolve for VettingResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_owned();
        let trusted = self.policy.is_allow_listed(&host);
        Box::pin(async move {
            // Port 0: the connector puts the URL's port on the addresses it gets.
            let resolved = tokio::net::lookup_host((host.as_str(), 0))
                .await
                .map_err(|_| Box::new(DestinationError::Unresolvable) as Box<dyn std::error::Error + Send + Sync>)?;
            let addresses: Vec<SocketAddr> = if trusted {
                resolved.collect()
            } else {
                check_resolved(resolved).map_err(|error| Box::new(error) as Box<dyn std::error::Error + Send + Sync>)?
            };
            let addresses: reqwest::dns::Addrs = Box::new(addresses.into_iter());
            Ok(addresses)
        })
    }
}

/// The policy refusal somewhere in `error`'s source chain (a connection the resolver
/// refused), if that is why it failed.
pub fn refusal_in(error: &(dyn std::error::Error + 'static)) -> Option<DestinationError> {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(error) = current {
        if let Some(refusal) = error.downcast_ref::<DestinationError>() {
            return Some(refusal.clone());
        }
        current = error.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::dns::Resolve as _;

    fn public() -> DestinationPolicy {
        DestinationPolicy::new(Vec::<String>::new())
    }

    #[test]
    fn public_https_urls_are_accepted() {
        for url in ["https://hooks.example.com/flowhost", "https://93.184.215.14/x", "https://[2606:4700::1111]/x", "https://example.com:8443/a?b=c"] {
            assert!(public().check_url(url).is_ok(), "{url}");
        }
    }

    #[test]
    fn ssrf_to_cloud_metadata_address_is_refused() {
        assert_eq!(public().check_url("https://169.254.169.254/latest/meta-data/"), Err(DestinationError::ForbiddenAddress("link-local (cloud metadata)")));
    }

    #[test]
    fn ssrf_to_private_loopback_and_reserved_literals_is_refused() {
        for (url, why) in [
            ("https://10.0.0.5/hook", "private"),
            ("https://172.20.1.1/hook", "private"),
            ("https://192.168.1.1/hook", "private"),
            ("https://100.64.0.1/hook", "shared (CGNAT)"),
            ("https://127.0.0.1/hook", "loopback"),
            ("https://127.1/hook", "loopback"),
            ("https://2130706433/hook", "loopback"), // 127.0.0.1 as one decimal number
            ("https://0.0.0.0/hook", "unspecified"),
            ("https://224.0.0.1/hook", "multicast"),
            ("https://255.255.255.255/hook", "reserved"),
            ("https://192.0.2.7/hook", "documentation"),
            ("https://[::1]/hook", "loopback"),
            ("https://[::]/hook", "unspecified"),
            ("https://[fe80::1]/hook", "link-local"),
            ("https://[fd00::1]/hook", "unique-local"),
            ("https://[ff02::1]/hook", "multicast"),
            ("https://[2001:db8::1]/hook", "documentation"),
            ("https://localhost/hook", "loopback"),
            ("https://api.localhost./hook", "loopback"),
        ] {
            assert_eq!(public().check_url(url), Err(DestinationError::ForbiddenAddress(why)), "{url}");
        }
    }

    #[test]
    fn ssrf_via_ipv6_forms_embedding_an_internal_ipv4_address_is_refused() {
        for (url, why) in [
            ("https://[::ffff:127.0.0.1]/", "loopback"),
            ("https://[::ffff:169.254.169.254]/", "link-local (cloud metadata)"),
            ("https://[::ffff:a00:1]/", "private"),
            ("https://[64:ff9b::10.0.0.1]/", "private"),
            ("https://[2002:c0a8:101::1]/", "private"), // 6to4 of 192.168.1.1
            ("https://[::127.0.0.1]/", "reserved"),     // deprecated IPv4-compatible form
        ] {
            assert_eq!(public().check_url(url), Err(DestinationError::ForbiddenAddress(why)), "{url}");
        }
        // The same forms around a public address are fine.
        assert!(public().check_url("https://[::ffff:93.184.215.14]/").is_ok());
    }

    #[test]
    fn plain_http_credentials_and_other_schemes_are_refused_without_an_allow_list() {
        assert_eq!(public().check_url("http://hooks.example.com/"), Err(DestinationError::NotHttps));
        assert_eq!(public().check_url("ftp://hooks.example.com/"), Err(DestinationError::NotHttps));
        assert_eq!(public().check_url("file:///etc/passwd"), Err(DestinationError::NotHttps));
        assert_eq!(public().check_url("https://user:pw@hooks.example.com/"), Err(DestinationError::Credentials));
        assert_eq!(public().check_url("/relative"), Err(DestinationError::NotAUrl));
    }

    #[test]
    fn url_length_obeyed() {
        let url = format!("https://hooks.example.com/{}", "a".repeat(MAX_URL_BYTES - "https://hooks.example.com/".len()));
        assert_eq!(url.len(), MAX_URL_BYTES);
        assert!(public().check_url(&url).is_ok());
    }

    #[test]
    fn url_length_violated() {
        let url = format!("https://hooks.example.com/{}", "a".repeat(MAX_URL_BYTES + 1 - "https://hooks.example.com/".len()));
        assert_eq!(public().check_url(&url), Err(DestinationError::TooLong));
    }

    #[test]
    fn an_allow_list_limits_destinations_to_its_hosts_at_any_address_and_scheme() {
        let policy = DestinationPolicy::new(["127.0.0.1".to_owned(), "Hooks.Internal".to_owned(), "[::1]".to_owned()]);
        assert!(policy.check_url("http://127.0.0.1:9000/hook").is_ok());
        assert!(policy.check_url("https://hooks.internal/hook").is_ok());
        assert!(policy.check_url("http://[::1]:9000/hook").is_ok());
        assert_eq!(policy.check_url("https://hooks.example.com/"), Err(DestinationError::NotAllowListed("hooks.example.com".into())));
        assert_eq!(policy.check_url("http://localhost:9000/"), Err(DestinationError::NotAllowListed("localhost".into())));
        assert_eq!(policy.check_url("http://user@127.0.0.1:9000/"), Err(DestinationError::Credentials));
        // An internal address off the list is refused for what it is.
        assert_eq!(policy.check_url("http://10.0.0.1/hook"), Err(DestinationError::ForbiddenAddress("private")));
        assert_eq!(policy.check_url("http://127.0.0.2/hook"), Err(DestinationError::ForbiddenAddress("loopback")));
    }

    #[tokio::test]
    async fn ssrf_via_a_name_resolving_to_loopback_is_refused_after_resolution() {
        // `localhost` is refused by name already; the resolver must refuse it on its own
        // (it is what stands between a rebinding name and the connector).
        let resolver = VettingResolver::new(public());
        let name: reqwest::dns::Name = "localhost".parse().unwrap();
        let error = match resolver.resolve(name).await {
            Ok(addresses) => panic!("resolved to {:?}", addresses.collect::<Vec<_>>()),
            Err(error) => error,
        };
        assert_eq!(refusal_in(error.as_ref()), Some(DestinationError::ResolvesToForbidden("loopback")));
    }

    #[tokio::test]
    async fn an_allow_listed_name_resolves_to_its_addresses() {
        let resolver = VettingResolver::new(DestinationPolicy::new(["localhost".to_owned()]));
        let name: reqwest::dns::Name = "localhost".parse().unwrap();
        let addresses: Vec<SocketAddr> = resolver.resolve(name).await.unwrap().collect();
        assert!(addresses.iter().all(|a| a.ip().is_loopback()) && !addresses.is_empty(), "{addresses:?}");
    }

    #[test]
    fn dns_rebinding_with_a_private_address_among_public_ones_is_refused() {
        let refused = check_resolved([SocketAddr::from(([93, 184, 215, 14], 443)), SocketAddr::from(([10, 1, 2, 3], 443))].into_iter());
        assert_eq!(refused, Err(DestinationError::ResolvesToForbidden("private")));
        assert_eq!(check_resolved(std::iter::empty()), Err(DestinationError::Unresolvable));
    }
}
