//! The original destination of a connection redirected by iptables `REDIRECT` (netfilter NAT):
//! `getsockopt(SOL_IP, SO_ORIGINAL_DST)` for IPv4 and `getsockopt(SOL_IPV6,
//! IP6T_SO_ORIGINAL_DST)` for IPv6 return the pre-NAT destination. This is what Envoy's
//! `envoy.filters.listener.original_dst` and `use_original_dst` read.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsRawFd;

/// `SO_ORIGINAL_DST` / `IP6T_SO_ORIGINAL_DST` from `<linux/netfilter_ipv4.h>` and
/// `<linux/netfilter_ipv6/ip6_tables.h>` (both 80; libc does not export them).
const SO_ORIGINAL_DST: libc::c_int = 80;
const IP6T_SO_ORIGINAL_DST: libc::c_int = 80;

/// The pre-NAT destination of `sock`, or `None` when the connection was not redirected (the
/// kernel answers `ENOENT` when there is no NAT entry for the connection).
pub fn original_dst<S: AsRawFd>(sock: &S, local: SocketAddr) -> io::Result<Option<SocketAddr>> {
    let fd = sock.as_raw_fd();
    // An IPv4 connection on a dual-stack socket shows a v4-mapped local address; its NAT entry
    // lives in the IPv4 table.
    let v4 = match local {
        SocketAddr::V4(_) => true,
        SocketAddr::V6(a) => a.ip().to_ipv4_mapped().is_some(),
    };
    let result = if v4 {
        // SAFETY: getsockopt writes at most `len` bytes into a properly sized, zeroed sockaddr_in.
        let mut addr: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_IP,
                SO_ORIGINAL_DST,
                &mut addr as *mut _ as *mut libc::c_void,
                &mut len,
            )
        };
        (rc == 0).then(|| {
            SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr)),
                u16::from_be(addr.sin_port),
            ))
        })
    } else {
        // SAFETY: as above, with sockaddr_in6.
        let mut addr: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_IPV6,
                IP6T_SO_ORIGINAL_DST,
                &mut addr as *mut _ as *mut libc::c_void,
                &mut len,
            )
        };
        (rc == 0).then(|| {
            SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(addr.sin6_addr.s6_addr),
                u16::from_be(addr.sin6_port),
                addr.sin6_flowinfo,
                addr.sin6_scope_id,
            ))
        })
    };
    match result {
        Some(a) => Ok(Some(a)),
        None => {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                // No conntrack/NAT entry: not redirected. ENOPROTOOPT: no netfilter at all.
                Some(libc::ENOENT) | Some(libc::ENOPROTOOPT) => Ok(None),
                _ => Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unredirected_connection_has_no_original_dst() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let _c = std::net::TcpStream::connect(addr).unwrap();
        let (s, _) = l.accept().unwrap();
        // Without a NAT entry the kernel reports none, or (conntrack loaded) the real destination.
        let got = original_dst(&s, addr).unwrap();
        assert!(got.is_none() || got == Some(addr), "{got:?}");
    }
}
