package org.fhirrerank.hapi;

import ca.uhn.fhir.batch2.jobs.config.Batch2JobsConfig;
import ca.uhn.fhir.jpa.batch2.JpaBatch2Config;
import ca.uhn.fhir.jpa.config.r4.JpaR4Config;
import ca.uhn.fhir.jpa.subscription.channel.config.SubscriptionChannelConfig;
import ca.uhn.fhir.rest.server.RestfulServer;
import org.springframework.boot.SpringApplication;
import org.springframework.boot.SpringBootConfiguration;
import org.springframework.boot.autoconfigure.ImportAutoConfiguration;
import org.springframework.boot.autoconfigure.context.PropertyPlaceholderAutoConfiguration;
import org.springframework.boot.autoconfigure.web.servlet.ServletWebServerFactoryAutoConfiguration;
import org.springframework.boot.context.event.ApplicationReadyEvent;
import org.springframework.boot.web.servlet.ServletRegistrationBean;
import org.springframework.context.ApplicationListener;
import org.springframework.context.annotation.Bean;
import org.springframework.context.annotation.Import;
import org.springframework.core.env.Environment;

import java.util.concurrent.TimeUnit;

/**
 * A real HAPI FHIR JPA server (R4) for the adapter's tests, on http://127.0.0.1:PORT/fhir.
 *
 * <p>Only the Spring Boot auto-configuration that runs the embedded Tomcat is switched on; the
 * FHIR server itself is HAPI's own JPA configuration ({@link JpaR4Config}, Batch2 for Bulk
 * {@code $export}) plus {@link HapiServerConfig}: in-memory H2 and an in-memory Lucene index.
 *
 * <p>Settings (Spring properties, so {@code --server.port=8090} on the command line works):
 * {@code server.port} (default 8090), {@code hapi.startup-timeout-s} (default 240: past it the
 * process prints why and exits 3, so a caller never waits forever).
 */
@SpringBootConfiguration
@ImportAutoConfiguration({
	PropertyPlaceholderAutoConfiguration.class,
	ServletWebServerFactoryAutoConfiguration.class
})
@Import({
	JpaR4Config.class,
	JpaBatch2Config.class,
	Batch2JobsConfig.class,
	SubscriptionChannelConfig.class, // the in-memory message broker Batch2 (Bulk $export) runs on
	HapiServerConfig.class
})
public class HapiTestServer {

	private static volatile boolean ready;

	public static void main(String[] args) {
		long started = System.nanoTime();
		checkPortIsFree(args);
		long timeoutS = Long.getLong("hapi.startup-timeout-s", startupTimeoutFromArgs(args));
		Thread watchdog = new Thread(() -> {
			try {
				TimeUnit.SECONDS.sleep(timeoutS);
			} catch (InterruptedException e) {
				return;
			}
			if (!ready) {
				System.err.println("HAPI test server: not ready after " + timeoutS
						+ " s (hapi.startup-timeout-s); giving up");
				Runtime.getRuntime().halt(3);
			}
		}, "hapi-startup-watchdog");
		watchdog.setDaemon(true);
		watchdog.start();

		SpringApplication app = new SpringApplication(HapiTestServer.class);
		app.addListeners((ApplicationListener<ApplicationReadyEvent>) event -> {
			ready = true;
			watchdog.interrupt();
			Environment env = event.getApplicationContext().getEnvironment();
			double seconds = (System.nanoTime() - started) / 1e9;
			// the fixture and `make hapi` read this line: keep its shape
			System.out.printf("HAPI FHIR %s ready at http://%s:%s/fhir (started in %.1f s)%n",
					ca.uhn.fhir.util.VersionUtil.getVersion(),
					env.getProperty("server.address", "127.0.0.1"), env.getProperty("local.server.port"),
					seconds);
			System.out.flush();
		});
		try {
			app.run(args);
		} catch (Throwable e) {
			// Spring Boot has logged the cause; say it in one line as well and exit non-zero
			Throwable root = e;
			while (root.getCause() != null && root.getCause() != root) {
				root = root.getCause();
			}
			System.err.println("HAPI test server failed to start: " + root);
			System.exit(2);
		}
	}

	/** Fail in a second, not after HAPI's minute of start-up, when the port is taken. */
	private static void checkPortIsFree(String[] args) {
		int port = 8090;
		for (String arg : args) {
			if (arg.startsWith("--server.port=")) {
				port = Integer.parseInt(arg.substring(arg.indexOf('=') + 1));
			}
		}
		if (port == 0) {
			return;
		}
		try (java.net.ServerSocket probe = new java.net.ServerSocket()) {
			probe.bind(new java.net.InetSocketAddress("127.0.0.1", port));
		} catch (java.io.IOException e) {
			System.err.println("HAPI test server failed to start: port " + port
					+ " on 127.0.0.1 is in use (" + e.getMessage() + "); pick another with HAPI_PORT=...");
			System.exit(2);
		}
	}

	private static long startupTimeoutFromArgs(String[] args) {
		for (String arg : args) {
			if (arg.startsWith("--hapi.startup-timeout-s=")) {
				return Long.parseLong(arg.substring(arg.indexOf('=') + 1));
			}
		}
		return 240;
	}

	@Bean
	public ServletRegistrationBean<RestfulServer> hapiServlet(RestfulServer restfulServer) {
		ServletRegistrationBean<RestfulServer> registration = new ServletRegistrationBean<>(restfulServer, "/fhir/*");
		registration.setLoadOnStartup(1);
		return registration;
	}
}
