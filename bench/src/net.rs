//! Loopback connections spread over several source addresses, and the
//! file-descriptor limit.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;

use tokio::net::{TcpSocket, TcpStream};

/// Client source addresses 127.0.0.2, 127.0.0.3, ...: each has its own
/// ephemeral port range, so 100,000 connections to one server port do not
/// run out of ports (one address gives about 28,000).
#[derive(Debug, Clone, Copy)]
pub struct Sources {
    count: u8,
}

impl Sources {
    /// `count` addresses from 127.0.0.2 on (1 to 250).
    pub fn new(count: u8) -> Self {
        Self {
            count: count.clamp(1, 250),
        }
    }

    /// The source address of connection number `i`.
    pub fn addr(&self, i: usize) -> Ipv4Addr {
        let n = u8::try_from(i % usize::from(self.count)).unwrap_or(0);
        Ipv4Addr::new(127, 0, 0, 2 + n)
    }

    /// Connects connection number `i` to `to` from its source address.
    pub async fn connect(&self, i: usize, to: SocketAddr) -> std::io::Result<TcpStream> {
        let socket = TcpSocket::new_v4()?;
        // The port is chosen at connect time, per destination, instead of at
        // bind time for every destination at once.
        let one: libc::c_int = 1;
        // SAFETY: a valid socket fd, a c_int option value and its size.
        let rc = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_BIND_ADDRESS_NO_PORT,
                (&raw const one).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        socket.bind(SocketAddr::V4(SocketAddrV4::new(self.addr(i), 0)))?;
        let stream = socket.connect(to).await?;
        stream.set_nodelay(true)?;
        Ok(stream)
    }
}

/// Raises this process's open-file limit to `want` (or the hard limit, if
/// raising that is not allowed). Returns the soft limit now in force.
pub fn raise_fd_limit(want: u64) -> std::io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if lim.rlim_cur >= want {
        return Ok(lim.rlim_cur);
    }
    let raised = libc::rlimit {
        rlim_cur: want,
        rlim_max: lim.rlim_max.max(want),
    };
    // SAFETY: setrlimit reads the struct we pass.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
        return Ok(want);
    }
    let capped = libc::rlimit {
        rlim_cur: lim.rlim_max,
        rlim_max: lim.rlim_max,
    };
    // SAFETY: as above.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &capped) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(lim.rlim_max)
}
